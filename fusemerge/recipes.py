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
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fusemerge.errors import FusemergeError

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
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FusemergeError("recipe file not found", file=path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FusemergeError(f"cannot read recipe ({exc})", file=path) from exc
    return LoadedRecipe(recipe=parse_recipe(text, path), path=path, text=text)


def parse_recipe(text: str, path: Path | str = "<recipe>") -> MergeRecipe:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise FusemergeError(f"invalid YAML: {problem}", file=path, line=line) from exc
    if not isinstance(data, dict):
        raise FusemergeError(
            "a recipe must be a YAML mapping (merge_method: ..., models: ...)", file=path, line=1
        )
    lines = key_lines(node)
    try:
        recipe = MergeRecipe.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, path, lines) from exc
    _check_structure(recipe, path, lines)
    return recipe


def key_lines(node: yaml.Node | None, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map each key path in a composed YAML document to its 1-based line number."""
    out: dict[tuple[Any, ...], int] = {}
    if node is None:
        return out
    out[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            out.update(key_lines(value_node, path))
            out[path] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(key_lines(item, (*prefix, i)))
    return out


def _line_for(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _validation_error(
    exc: ValidationError, path: Path | str, lines: dict[tuple[Any, ...], int]
) -> FusemergeError:
    # Union members each report an error; the first "real" one (not a type mismatch of another member)
    # is the most helpful.
    errors = exc.errors()
    first = next((e for e in errors if e["type"] in ("extra_forbidden", "missing")), errors[0])
    loc = tuple(
        p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function")))
    )
    key = ".".join(str(p) for p in loc) or None
    if first["type"] == "extra_forbidden":
        message = "unknown key (not a mergekit recipe key)"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        message = first["msg"]
    return FusemergeError(message, file=path, line=_line_for(lines, tuple(first["loc"])), key=key)


def _check_structure(recipe: MergeRecipe, path: Path | str, lines: dict[tuple[Any, ...], int]) -> None:
    given = [key for key in ("models", "slices", "modules") if getattr(recipe, key)]
    if not given:
        raise FusemergeError(
            "the recipe lists no models (give models, slices or modules)",
            file=path,
            line=lines.get(("models",)),
            key="models",
        )
    if len(given) > 1:
        raise FusemergeError(
            f"give exactly one of models, slices or modules (got {' and '.join(given)})",
            file=path,
            line=lines.get((given[1],)),
            key=given[1],
        )
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise FusemergeError(
            "give either tokenizer_source or a tokenizer section, not both",
            file=path,
            line=lines.get(("tokenizer",)),
            key="tokenizer",
        )
