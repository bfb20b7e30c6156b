"""The merge recipe: mergekit's YAML, as frozen pydantic models with errors that point at file, line and key.

The raw YAML text is kept so that it can be written verbatim into the output folder and the model card.
Features that mergekit has and the streaming engine does not (`slices`, `modules`, `tokenizer`,
`tokenizer_source: union`) are accepted here and routed to the mergekit fallback engine (see
`fusemerge.merge.routing`); the streaming planner refuses them by name, never ignores them.

`read_recipe` reads and parses a recipe file once for both engines: the YAML data goes to the mergekit
fallback as is, the validated `MergeRecipe` to the streaming planner. mergekit-moe's `experts` format is
mergekit's own: it is parsed here, and validated by mergekit's schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, field_validator

from fusemerge.errors import FusemergeError
from fusemerge.yaml_recipes import line_of, parse_mapping, read_recipe_text, validate

ScalarValue = bool | int | float | str
ScalarOrGradient = ScalarValue | list[ScalarValue]


class ConditionalParameter(BaseModel):
    """`{filter: self_attn, value: [0, 0.5, 1]}`: applies to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ScalarValue | list[ScalarValue] | list[ConditionalParameter] | ConditionalParameter


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    parameters: dict[str, ParameterSetting] | None = None

    @field_validator("model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model reference is empty")
        return value


class MergeRecipe(BaseModel):
    """mergekit's `MergeConfiguration`; the mergekit-only sections are validated by mergekit itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    # Only the mergekit fallback engine runs these; mergekit's own schema checks them.
    slices: list[Any] | None = None
    modules: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, without duplicates, in recipe order."""
        seen: list[str] = []
        slice_refs = [
            src.get("model")
            for sl in self.slices or []
            if isinstance(sl, dict)
            for src in sl.get("sources") or []
            if isinstance(src, dict)
        ]
        for ref in [self.base_model, *(m.model for m in self.models or []), *slice_refs]:
            if ref is not None and ref not in seen:
                seen.append(ref)
        return seen


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from and its verbatim text."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    recipe: MergeRecipe
    path: Path
    text: str


@dataclass(frozen=True)
class RecipeFile:
    """A recipe file read and parsed once: its text, its YAML data and, unless it is mergekit-moe's
    format, the validated recipe."""

    path: Path
    text: str
    data: Mapping[str, Any]
    loaded: LoadedRecipe | None  # None for a mergekit-moe recipe

    @property
    def moe(self) -> bool:
        return self.loaded is None


def is_moe_recipe(data: Any) -> bool:
    """mergekit-moe's format: a base model and a list of `experts`, no merge_method."""
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def read_recipe(path: str | Path) -> RecipeFile:
    """Read and parse the recipe at `path` once; a merge recipe is validated, a MoE one left to mergekit."""
    path = Path(path)
    text = read_recipe_text(path)
    data, node = parse_mapping(text, path, what=_WHAT)
    if is_moe_recipe(data):
        return RecipeFile(path, text, data, None)
    loaded = LoadedRecipe(recipe=_validated(data, node, path), path=path, text=text)
    return RecipeFile(path, text, data, loaded)


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path)
    text = read_recipe_text(path)
    return LoadedRecipe(recipe=parse_recipe(text, path), path=path, text=text)


def parse_recipe(text: str, path: Path | str = "<recipe>") -> MergeRecipe:
    data, node = parse_mapping(text, path, what=_WHAT)
    return _validated(data, node, path)


_WHAT = "merge_method: ..., models: ..."


def _validated(data: dict[str, Any], node: yaml.Node | None, path: Path | str) -> MergeRecipe:
    recipe = validate(MergeRecipe, data, path, node)
    _check_structure(recipe, path, node)
    return recipe


def _check_structure(recipe: MergeRecipe, path: Path | str, node: yaml.Node | None) -> None:
    given = [key for key in ("models", "slices", "modules") if getattr(recipe, key)]
    if not given:
        raise FusemergeError(
            "the recipe lists no models (give models, slices or modules)",
            file=path,
            line=line_of(node, ("models",)),
            key="models",
        )
    if len(given) > 1:
        raise FusemergeError(
            f"give exactly one of models, slices or modules (got {' and '.join(given)})",
            file=path,
            line=line_of(node, (given[1],)),
            key=given[1],
        )
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise FusemergeError(
            "give either tokenizer_source or a tokenizer section, not both",
            file=path,
            line=line_of(node, ("tokenizer",)),
            key="tokenizer",
        )
