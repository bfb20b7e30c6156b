"""One registry of merge methods, filled by the `merge_method` decorator.

A method is a pure tensor function: it gets the input tensors (already in the recipe's `dtype`), the base
tensor (or None) and its resolved parameters as keyword arguments (per-model parameters as lists aligned
with the inputs), and returns the merged tensor in float32 (float64 for float64 inputs). It never touches
files, devices or progress bars: the engine owns those. `pretty_name` and `reference_url` feed the card.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fusemerge.errors import FusemergeError
from fusemerge.merge.parameters import Param

if TYPE_CHECKING:
    import torch

BasePolicy = Literal["required", "optional", "ignored"]
# Group statistics: (tensors, base, params) -> per-model statistic tensor, summed over a group's tensors.
StatsFn = Callable[..., "torch.Tensor"]
GroupKeyFn = Callable[[str, dict[str, Any]], str]
# Plan-time check of one tensor's resolved parameters: (shared, per_model) -> None, raises FusemergeError.
CheckFn = Callable[[dict[str, Any], dict[str, list[Any]]], None]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    pretty_name: str
    reference_url: str
    base: BasePolicy = "ignored"
    min_models: int = 1
    max_models: int | None = None
    shared: dict[str, Param] = field(default_factory=dict)
    per_model: dict[str, Param] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    # Methods whose weights depend on statistics over a group of tensors (VaRM at layer/model
    # granularity) declare how to compute one tensor's statistics and how tensors group.
    stats: StatsFn | None = None
    group_key: GroupKeyFn | None = None
    # Random methods (DARE, DELLA) get a keyword `seed`: an int derived from the run's seed and the tensor
    # name, so results depend neither on the order tensors are read nor on which shards a resume redoes.
    random: bool = False
    # Parameter combinations that mergekit would only reject mid-merge are rejected at plan time.
    check: CheckFn | None = None

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


_METHODS: dict[str, MergeMethod] = {}
_ALIASES: dict[str, str] = {}


def merge_method(
    name: str,
    *,
    pretty_name: str,
    reference_url: str,
    base: BasePolicy = "ignored",
    min_models: int = 1,
    max_models: int | None = None,
    shared: dict[str, Param] | None = None,
    per_model: dict[str, Param] | None = None,
    aliases: Sequence[str] = (),
    stats: StatsFn | None = None,
    group_key: GroupKeyFn | None = None,
    random: bool = False,
    check: CheckFn | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        method = MergeMethod(
            name=name,
            fn=fn,
            pretty_name=pretty_name,
            reference_url=reference_url,
            base=base,
            min_models=min_models,
            max_models=max_models,
            shared=dict(shared or {}),
            per_model=dict(per_model or {}),
            aliases=tuple(aliases),
            stats=stats,
            group_key=group_key,
            random=random,
            check=check,
        )
        for key in (name, *aliases):
            if key in _METHODS or key in _ALIASES:
                raise ValueError(f"merge method '{key}' is registered twice")
        _METHODS[name] = method
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    _load_builtin_methods()
    key = _ALIASES.get(name, name)
    if key not in _METHODS:
        raise FusemergeError(
            f"unknown merge method '{name}' (available: {', '.join(sorted(_METHODS))})", key="merge_method"
        )
    return _METHODS[key]


def all_methods() -> list[MergeMethod]:
    _load_builtin_methods()
    return sorted(_METHODS.values(), key=lambda m: m.name)


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method through the decorator.
    import fusemerge.merge.methods  # noqa: F401
