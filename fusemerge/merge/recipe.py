"""The merge recipe: mergekit's YAML, as frozen pydantic models with errors that point at file, line and key.

The raw YAML text is kept so that it can be written verbatim into the output folder and the model card.
Features that mergekit has and the streaming engine does not (`slices`, `modules`, `tokenizer`,
`tokenizer_source: union`) are accepted here and routed to the mergekit fallback engine (see
`fusemerge.merge.fallback`); the streaming planner refuses them by name, never ignores them.
"""

from __future__ import annotations

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


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path)
    text = read_recipe_text(path)
    return LoadedRecipe(recipe=parse_recipe(text, path), path=path, text=text)


def parse_recipe(text: str, path: Path | str = "<recipe>") -> MergeRecipe:
    data, node = parse_mapping(text, path, what="merge_method: ..., models: ...")
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
