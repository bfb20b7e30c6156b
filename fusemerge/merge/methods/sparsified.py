"""Sparsified task arithmetic: DARE, model breadcrumbs and DELLA, each with and without TIES' sign election.

All six share task arithmetic's combination step (`combine`: weighted task vectors, optional sign
consensus, `normalize`, `lambda`, L1 `rescale`); they differ in which deltas they drop, exactly as
mergekit's generalized task arithmetic builds them, with its parameter names and defaults:

- DARE (`dare_linear`, `dare_ties`): each delta survives with probability `density`; `rescale` (on by
  default) multiplies the survivors by |delta|_1 / |kept|_1, about 1 / density.
- breadcrumbs (`breadcrumbs`, `breadcrumbs_ties`): drop the `gamma` fraction of largest magnitudes and
  then the smallest, keeping `density` of the elements (magnitude bands by k-th value selection; ties go
  to the lowest indices where mergekit's unstable sort picks arbitrary ones).
- DELLA (`della`, `della_linear`): MagPrune, a keep probability from density - epsilon to
  density + epsilon by magnitude rank within each row.

The random ones draw from generators seeded by the run's `--random-seed`, the tensor name and the model's
position, so a merge is reproducible whatever the prefetch order; they cannot reproduce mergekit's draws
(global torch RNG, consumed in graph order), only their statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fusemerge.errors import FusemergeError
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.methods.task_arithmetic import GTA_PER_MODEL, GTA_SHARED, combine
from fusemerge.merge.parameters import Param
from fusemerge.merge.sparsify import Mask, breadcrumb_mask, dare_masks, della_masks

DARE_URL = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_URL = "https://arxiv.org/abs/2312.06795"
DELLA_URL = "https://arxiv.org/abs/2406.11617"


def _shared(normalize: bool, rescale: bool) -> dict[str, Param]:
    return {
        **GTA_SHARED,
        "normalize": Param(bool, normalize, "divide by the sum of (agreeing) weights"),
        "rescale": Param(bool, rescale, "rescale kept deltas to the task vector's L1 norm"),
    }


GAMMA = {"gamma": Param(float, 0.01, "fraction of largest-magnitude deltas dropped as outliers")}
EPSILON = {"epsilon": Param(float, 0.15, "keep probabilities span density - epsilon .. density + epsilon")}


def _run(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    masks: list[Mask | None],
    params: dict[str, Any],
    *,
    consensus: bool,
) -> torch.Tensor:
    return combine(
        tensors,
        base,
        params["weight"],
        masks,
        params["rescale"],
        params["normalize"],
        params["lambda"],
        consensus=consensus,
    )


# -- DARE ---------------------------------------------------------------------------------------------
@merge_method(
    "dare_linear",
    pretty_name="Linear DARE",
    reference_url=DARE_URL,
    base="required",
    shared=_shared(normalize=False, rescale=True),
    per_model=GTA_PER_MODEL,
    random=True,
)
def dare_linear(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, *, seed: int, **params: Any
) -> torch.Tensor:
    """Drop each delta with probability 1 - density and rescale the rest, then add (Yu et al. 2023)."""
    masks = dare_masks(len(tensors), params["density"], seed)
    return _run(tensors, base, masks, params, consensus=False)


@merge_method(
    "dare_ties",
    pretty_name="DARE TIES",
    reference_url=DARE_URL,
    base="required",
    shared=_shared(normalize=False, rescale=True),
    per_model=GTA_PER_MODEL,
    random=True,
)
def dare_ties(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, *, seed: int, **params: Any
) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election (Yu et al. 2023)."""
    masks = dare_masks(len(tensors), params["density"], seed)
    return _run(tensors, base, masks, params, consensus=True)


# -- breadcrumbs --------------------------------------------------------------------------------------
def _breadcrumbs(tensors, base, params, *, consensus: bool) -> torch.Tensor:
    masks = [
        breadcrumb_mask(t, base, d, g)
        for t, d, g in zip(tensors, params["density"], params["gamma"], strict=True)
    ]
    return _run(tensors, base, masks, params, consensus=consensus)


@merge_method(
    "breadcrumbs",
    pretty_name="Model Breadcrumbs",
    reference_url=BREADCRUMBS_URL,
    base="required",
    shared=_shared(normalize=False, rescale=False),
    per_model={**GTA_PER_MODEL, **GAMMA},
)
def breadcrumbs(tensors: Sequence[torch.Tensor], base: torch.Tensor, **params: Any) -> torch.Tensor:
    """Drop the largest (outliers) and smallest deltas of each task vector, then add (Davari & Belilovsky 2023)."""
    return _breadcrumbs(tensors, base, params, consensus=False)


@merge_method(
    "breadcrumbs_ties",
    pretty_name="Model Breadcrumbs with TIES",
    reference_url=BREADCRUMBS_URL,
    base="required",
    shared=_shared(normalize=False, rescale=False),
    per_model={**GTA_PER_MODEL, **GAMMA},
)
def breadcrumbs_ties(tensors: Sequence[torch.Tensor], base: torch.Tensor, **params: Any) -> torch.Tensor:
    """Breadcrumbs' magnitude band, then TIES' sign election (Davari & Belilovsky 2023)."""
    return _breadcrumbs(tensors, base, params, consensus=True)


# -- DELLA --------------------------------------------------------------------------------------------
def check_della(shared: dict[str, Any], per_model: dict[str, list[Any]]) -> None:
    for density, epsilon in zip(per_model["density"], per_model["epsilon"], strict=True):
        if 0 < density < 1 and not (density + epsilon < 1 and density - epsilon > 0):
            raise FusemergeError(
                f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1)",
                key="parameters.epsilon",
            )


def _della(tensors, base, params, seed: int, *, consensus: bool) -> torch.Tensor:
    masks = della_masks(tensors, base, params["density"], params["epsilon"], seed)
    return _run(tensors, base, masks, params, consensus=consensus)


@merge_method(
    "della",
    pretty_name="DELLA",
    reference_url=DELLA_URL,
    base="required",
    shared=_shared(normalize=True, rescale=True),
    per_model={**GTA_PER_MODEL, **EPSILON},
    random=True,
    check=check_della,
)
def della(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, seed: int, **params: Any) -> torch.Tensor:
    """Drop deltas with magnitude-ranked probabilities (MagPrune), rescale, elect signs (Deep et al. 2024)."""
    return _della(tensors, base, params, seed, consensus=True)


@merge_method(
    "della_linear",
    pretty_name="Linear DELLA",
    reference_url=DELLA_URL,
    base="required",
    shared=_shared(normalize=False, rescale=True),
    per_model={**GTA_PER_MODEL, **EPSILON},
    random=True,
    check=check_della,
)
def della_linear(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, *, seed: int, **params: Any
) -> torch.Tensor:
    """MagPrune and rescale, then add the task vectors without sign election (Deep et al. 2024)."""
    return _della(tensors, base, params, seed, consensus=False)
