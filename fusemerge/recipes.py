"""The merge recipe: mergekit's YAML, as frozen pydantic models with errors that point at file, line and key.

The raw YAML text is kept so that it can be written verbatim into the output folder and the model card.
Features that mergekit has and the streaming engine does not (yet) are refused by name rather than ignored:
a recipe that silently merged differently from mergekit would be worse than no merge.
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
    """mergekit's `MergeConfiguration`, restricted to what the streaming engine does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    # Accepted by mergekit, refused here with a message (see `_refuse_unsupported`).
    slices: list[Any] | None = None
    modules: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, without duplicates, in recipe order."""
        seen: list[str] = []
        for ref in [self.base_model, *(m.model for m in self.models or [])]:
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
    for key, what in (
        ("slices", "slices (frankenmerges)"),
        ("modules", "modules"),
        ("tokenizer", "the 'tokenizer' section (vocabulary union/permutation)"),
    ):
        if getattr(recipe, key) is not None:
            raise FusemergeError(
                f"{what} is not supported by the streaming engine yet; run this recipe with mergekit-yaml",
                file=path,
                line=line_of(node, (key,)),
                key=key,
            )
    if recipe.tokenizer_source == "union":
        raise FusemergeError(
            "tokenizer_source: union is not supported by the streaming engine yet; use 'base' or a model",
            file=path,
            line=line_of(node, ("tokenizer_source",)),
            key="tokenizer_source",
        )
    if not recipe.models:
        raise FusemergeError(
            "the recipe lists no models", file=path, line=line_of(node, ("models",)), key="models"
        )
