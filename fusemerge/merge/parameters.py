"""mergekit's parameter semantics: scalars, gradients over layers, and filters by tensor name.

A value is a scalar; a list of numbers (a gradient: interpolated linearly at t = layer / (layers - 1), and
t = 0 for tensors outside the layer stack, as mergekit's planner does); a list of non-numbers (picked at
int(t * (n - 1))); or a list of `{filter, value}` conditions where the first whose filter is a substring of
the tensor name (or absent, or '*') wins. Per-model settings take precedence over the recipe's top-level
`parameters`; a condition list with no match falls through to the next level.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fusemerge.errors import FusemergeError
from fusemerge.merge.recipe import ConditionalParameter

MISSING: Any = object()
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: its type, and its default (MISSING = required)."""

    type: Any
    default: Any = MISSING
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @cached_property
    def _adapter(self) -> TypeAdapter:
        return TypeAdapter(self.type)

    def validate(self, value: Any, *, name: str) -> Any:
        try:
            return self._adapter.validate_python(value)
        except ValidationError as exc:
            raise FusemergeError(
                f"expected {getattr(self.type, '__name__', self.type)}, got {value!r}", key=name
            ) from exc


def layer_index(tensor_name: str) -> int | None:
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_t(tensor_name: str, num_layers: int) -> float:
    """mergekit's gradient position: layer / (layers - 1) in the layer stack, 1 for a single layer, else 0."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return index / (num_layers - 1)


def evaluate_setting(tensor_name: str, setting: Any, t: float, param: Param, *, name: str) -> Any:
    """Resolve one setting for one tensor; None where a condition list has no matching filter."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return param.validate(setting, name=name)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, bool | int | float | str) for e in setting):
            values = [param.validate(e, name=name) for e in setting]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return param.validate((1 - frac) * values[i0] + frac * values[i1], name=name)
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, param, name=name)
        return None
    raise FusemergeError(f"unexpected parameter value {setting!r}", key=name)


def resolve(
    name: str,
    param: Param,
    scopes: Iterable[Mapping[str, Any] | None],
    *,
    tensor_name: str,
    t: float,
    model: str | None = None,
    wheres: Sequence[str] | None = None,
    missing_key: str | None = None,
) -> Any:
    """The first scope (highest precedence first) that yields a value wins; else the default.

    `wheres`: each scope's key in the recipe (`models[0].parameters`), so that a bad value's error names
    its own line; `missing_key`: the key a missing required parameter is reported at.
    """
    for i, scope in enumerate(scopes):
        if scope is not None and name in scope:
            try:
                value = evaluate_setting(tensor_name, scope[name], t, param, name=name)
            except FusemergeError as exc:
                if wheres is None:
                    raise
                raise FusemergeError(exc.message, key=f"{wheres[i]}.{name}", tensor=tensor_name) from None
            if value is not None:
                return value
    if param.required:
        where = f" for model '{model}'" if model else ""
        raise FusemergeError(
            f"required parameter '{name}' is not set{where}",
            key=missing_key or f"parameters.{name}",
            tensor=tensor_name,
        )
    return param.default


def check_parameter_names(
    method: str,
    known: Iterable[str],
    where: str,
    scope: Mapping[str, Any] | None,
    *,
    file: Any,
    strict: bool = False,
    warn: Callable[[FusemergeError], None] | None = None,
) -> None:
    """A parameter the method does not take is ignored with a warning, as mergekit ignores it (its own
    test recipes give every method a `weight`); with `strict` it is an error. Both engines."""
    names = set(known)
    takes = ", ".join(sorted(names)) or "none"
    for name in scope or {}:
        if name in names:
            continue
        if strict or warn is None:
            raise FusemergeError(
                f"not used by '{method}' (it takes: {takes}); without --strict it is ignored, as mergekit does",
                file=file,
                key=f"{where}.{name}",
            )
        warn(
            FusemergeError(
                f"not used by '{method}'; ignored, as mergekit does", file=file, key=f"{where}.{name}"
            )
        )
