"""The merge-method registry: the generic `fusemerge.registry.Registry`, with what a merge method declares.

The method contract, as the engine (`fusemerge.merge.engine`) really calls it:
- a method is a pure tensor function `fn(tensors, base, **params)`: the input tensors (non-base models in
  recipe order) and the base tensor (or None), on the merge device, already in the task's working dtype
  (the recipe's `dtype`, else the inputs' promoted dtype); its resolved parameters arrive as keyword
  arguments, per-model ones as lists aligned with the inputs; a group-statistics method also gets
  `group_stats`, a random one an int `seed` (derived by the engine, see `fusemerge.merge.seeds`);
- it returns a tensor of the output's shape in its computation dtype: float32 (float64 when an input is
  float64), except that the CPU kernel paths (linear, task arithmetic, TIES and the sparsified variants,
  VaRM) return bf16 directly when every input is bf16, rounded once exactly as a float32 result cast to
  bf16 would be (tested); the engine then casts through the working dtype to the output dtype, so both
  forms give the same output;
- it never touches files, devices or progress bars: the engine owns those. `pretty_name` and
  `reference_url` feed the model card.

Importing `fusemerge.merge.methods` registers the built-in methods; this module imports none of them, so
the registry and the methods form no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from fusemerge.merge.parameters import Param
from fusemerge.registry import Entry, Registry

if TYPE_CHECKING:
    import torch

BasePolicy = Literal["required", "optional", "ignored"]
MethodFn = Callable[..., "torch.Tensor"]
# Group statistics: (tensors, base, params) -> per-model statistic tensor, summed over a group's tensors.
StatsFn = Callable[..., "torch.Tensor"]
GroupKeyFn = Callable[[str, dict[str, Any]], str]
# Plan-time check of one tensor's resolved parameters: (shared, per_model) -> None, raises FusemergeError.
CheckFn = Callable[[dict[str, Any], dict[str, list[Any]]], None]


@dataclass(frozen=True)
class MergeMethod(Entry[MethodFn]):
    """A registry entry plus what the planner needs: base policy, model counts, parameters, hooks."""

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
    # Random methods (DARE, DELLA) get a keyword `seed`: an int derived by the engine from the run's seed
    # and the tensor name, so results depend neither on the order tensors are read nor on which shards a
    # resume redoes.
    random: bool = False
    # Parameter combinations that mergekit would only reject mid-merge are rejected at plan time.
    check: CheckFn | None = None

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


class MergeMethodRegistry(Registry[MethodFn]):
    """Merge methods by name or alias (`varm` is `variation_ratio`)."""

    def __init__(self) -> None:
        super().__init__("merge method")
        self._aliases: dict[str, str] = {}

    def add(self, method: MergeMethod) -> None:
        for key in (method.name, *method.aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"merge method '{key}' is registered twice")
        self._entries[method.name] = method
        for alias in method.aliases:
            self._aliases[alias] = method.name

    def get(self, name: str, *, key: str | None = "merge_method") -> MergeMethod:
        return cast(MergeMethod, super().get(self._aliases.get(name, name), key=key))

    def methods(self) -> list[MergeMethod]:
        """Every registered method, sorted by name."""
        return [self.get(name) for name in self.names()]


METHODS = MergeMethodRegistry()


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
) -> Callable[[MethodFn], MethodFn]:
    """Register the decorated tensor function as merge method `name` (see the contract above)."""

    def register(fn: MethodFn) -> MethodFn:
        METHODS.add(
            MergeMethod(
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
        )
        return fn

    return register
