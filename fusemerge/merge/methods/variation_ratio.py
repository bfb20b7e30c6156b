"""VaRM: Variation Ratio Merge, the FuseChat paper's merging method (Wan et al. 2024, section 3.3).

Per parameter matrix m: W_j,m = mean((theta_j,m - theta_base,m)^2) / sum_k mean((theta_k,m - theta_base,m)^2)
and theta_m = sum_j W_j,m * theta_j,m. A model that moved a matrix further from the pivot during fusion
learned more there, so it gets more say. `granularity` pools the statistic over a layer or the whole model;
`weight` multiplies each model's statistic before normalisation. All-zero variation gives uniform weights.
Equivalent to SCE with `select_topk: 1` and no sign-consensus erase.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from fusemerge.merge.kernels.chunks import compute_dtype, flat, spans, weighted_sum
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param, layer_index

Granularity = Literal["matrix", "layer", "model"]


def variation_stats(tensors: Sequence[torch.Tensor], base: torch.Tensor, **_: Any) -> torch.Tensor:
    """Per model: [sum of squared deltas, element count], in float64 so sums over a model stay exact."""
    dtype = compute_dtype([*tensors, base])
    stats = torch.zeros(len(tensors), 2, dtype=torch.float64)
    b_flat = flat(base)
    for j, tensor in enumerate(tensors):
        x_flat = flat(tensor)
        for span in spans(tensor.numel()):
            d = x_flat[span].to(dtype) - b_flat[span].to(dtype)
            stats[j, 0] += float(torch.dot(d, d))
        stats[j, 1] = tensor.numel()
    return stats


def variation_group(tensor_name: str, shared: dict[str, Any]) -> str:
    granularity = shared["granularity"]
    if granularity == "model":
        return "<model>"
    if granularity == "layer":
        index = layer_index(tensor_name)
        return f"<layer {index}>" if index is not None else tensor_name
    return tensor_name


@merge_method(
    "variation_ratio",
    aliases=("varm",),
    pretty_name="VaRM (Variation Ratio Merge)",
    reference_url="https://arxiv.org/abs/2408.07990",
    base="required",
    min_models=2,
    shared={"granularity": Param(Granularity, "matrix", "matrix | layer | model: where variation is pooled")},
    per_model={"weight": Param(float, 1.0, "multiplies the model's variation before normalisation")},
    stats=variation_stats,
    group_key=variation_group,
)
def variation_ratio(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    granularity: Granularity,
    group_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight each model by its share of the squared change from the pivot (FuseChat VaRM, Wan et al. 2024)."""
    stats = group_stats if group_stats is not None else variation_stats(tensors, base)
    return weighted_sum(tensors, variation_weights(stats, weight))


def variation_weights(stats: torch.Tensor, weight: Sequence[float] | None = None) -> list[float]:
    """W_j = weight_j * mean squared delta_j / sum_k (the same); uniform when no model moved at all."""
    n = stats.shape[0]
    scale = torch.tensor(list(weight) if weight is not None else [1.0] * n, dtype=torch.float64)
    variation = stats[:, 0] / stats[:, 1].clamp(min=1) * scale
    total = float(variation.sum())
    return (variation / total).tolist() if total != 0 else [1.0 / n] * n
