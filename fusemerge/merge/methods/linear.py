"""Linear (weighted average) merging, as mergekit's `linear`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fusemerge.errors import FusemergeError
from fusemerge.merge.kernels.chunks import weighted_sum
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param


def check_linear(shared: dict[str, Any], per_model: dict[str, list[Any]]) -> None:
    """Zero-sum weights cannot be normalised: say so at plan time, not mid-merge."""
    if shared["normalize"] and sum(per_model["weight"]) == 0:
        raise FusemergeError("linear: the weights sum to zero, cannot normalize", key="parameters.weight")


@merge_method(
    "linear",
    pretty_name="Linear",
    reference_url="https://arxiv.org/abs/2203.05482",
    base="ignored",
    shared={"normalize": Param(bool, True, "divide by the sum of weights")},
    per_model={"weight": Param(float, doc="the model's coefficient")},
    check=check_linear,
)
def linear(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, weight: list[float], normalize: bool
) -> torch.Tensor:
    """Weighted average of the models (Model Soups, Wortsman et al. 2022)."""
    total = sum(weight)
    if normalize and total == 0:
        raise FusemergeError("linear: the weights sum to zero, cannot normalize", key="parameters.weight")
    return weighted_sum(tensors, weight, total if normalize else 1.0)
