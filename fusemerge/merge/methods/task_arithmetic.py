"""Task arithmetic and TIES: merging task vectors (model - base), as mergekit's generalized task arithmetic.

Numerics: mergekit computes these in the recipe's `dtype` (bf16 arithmetic for `dtype: bfloat16`);
fusemerge computes deltas, sparsification and sums in float32 and rounds once at the end, which is more
exact; outputs can differ from mergekit's by one bf16 step on a small fraction of elements.
TIES keeps each task vector's top-`density` magnitudes by a k-th value selection (O(n)) rather than a full
argsort (O(n log n)); exactly k elements are kept, ties at the threshold going to the lowest indices where
mergekit's unstable argsort picks arbitrary ones. bf16 task vectors take few distinct values, so such ties
are common there: expect about 1% of TIES outputs in bf16 recipes to differ from mergekit's by more than one
bf16 step for this reason (float32 recipes match).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusemerge.merge.methods.chunks import compute_dtype, flat, spans
from fusemerge.merge.methods.masks import NONE_KEPT, Keep, Mask, magnitudes, top_k
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param

GTA_SHARED = {
    "normalize": Param(bool, False, "divide by the sum of weights"),
    "lambda": Param(float, 1.0, "scale of the merged task vector"),
    "int8_mask": Param(bool, False, "store masks as int8 (memory only; same result)"),
    "rescale": Param(bool, False, "rescale kept deltas to the original L1 norm"),
}
GTA_PER_MODEL = {
    "weight": Param(float, doc="coefficient of the model's task vector"),
    "density": Param(float, 1.0, "fraction of the task vector kept"),
}


@merge_method(
    "task_arithmetic",
    pretty_name="Task Arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
    base="required",
    shared=GTA_SHARED,
    per_model=GTA_PER_MODEL,
)
def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    normalize: bool,
    rescale: bool,
    int8_mask: bool,
    **shared: float,
) -> torch.Tensor:
    """Base plus the weighted sum of task vectors (Ilharco et al. 2022).

    `density` is accepted and, as in mergekit, unused: task arithmetic does not sparsify.
    """
    thresholds: list[Mask | None] = [None] * len(tensors)
    return combine(tensors, base, weight, thresholds, rescale, normalize, shared["lambda"], consensus=False)


@merge_method(
    "ties",
    pretty_name="TIES",
    reference_url="https://arxiv.org/abs/2306.01708",
    base="required",
    shared={**GTA_SHARED, "normalize": Param(bool, True, "divide by the sum of agreeing weights")},
    per_model=GTA_PER_MODEL,
)
def ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    normalize: bool,
    rescale: bool,
    int8_mask: bool,
    **shared: float,
) -> torch.Tensor:
    """Trim to the top-density magnitudes, elect a sign by summed mass, merge the agreeing deltas (Yadav et al. 2023)."""
    thresholds = [
        _magnitude_keep(t, base, d) if d < 1 else None for t, d in zip(tensors, density, strict=True)
    ]
    return combine(tensors, base, weight, thresholds, rescale, normalize, shared["lambda"], consensus=True)


def _magnitude_keep(tensor: torch.Tensor, base: torch.Tensor, density: float) -> Keep:
    """Select the top k = max(1, int(density * n)) magnitudes of the task vector by a k-th value search."""
    n = tensor.numel()
    if density <= 0 or n == 0:
        return NONE_KEPT
    return top_k(magnitudes(tensor, base), max(1, int(density * n)))


def combine(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    thresholds: Sequence[Mask | None],
    rescale: bool,
    normalize: bool,
    lambda_: float,
    *,
    consensus: bool,
) -> torch.Tensor:
    dtype = compute_dtype([*tensors, base])
    scales = rescale_factors(tensors, base, thresholds, dtype) if rescale else [1.0] * len(tensors)
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    out_flat, b_flat = flat(out), flat(base)
    inputs = [flat(t) for t in tensors]
    for span in spans(out.numel()):
        b = b_flat[span].to(dtype)
        deltas = []
        for x, w, thr, s in zip(inputs, weight, thresholds, scales, strict=True):
            d = x[span].to(dtype) - b
            if thr is not None:
                d.mul_(thr.mask(d.abs(), span))
            deltas.append(d.mul_(w * s))
        if consensus:
            majority = torch.where(sum(deltas) >= 0, 1.0, -1.0).to(dtype)
            mixed = torch.zeros_like(b)
            divisor = torch.zeros_like(b)
            for d, w in zip(deltas, weight, strict=True):
                agree = d.sign() == majority
                mixed.add_(d * agree)
                divisor.add_(agree.to(dtype), alpha=w)
            divisor[divisor == 0] = 1
        else:
            mixed = sum(deltas)
            divisor = torch.full_like(b, sum(weight))
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed = mixed / divisor
        out_flat[span] = b + mixed * lambda_
    return out


def rescale_factors(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, thresholds: Sequence[Mask | None], dtype: torch.dtype
) -> list[float]:
    """L1 norm before / after sparsification, per model (1 where nothing was dropped or norms vanish)."""
    eps = 1e-7
    factors = []
    b_flat = flat(base)
    for tensor, thr in zip(tensors, thresholds, strict=True):
        if thr is None:
            factors.append(1.0)
            continue
        before = after = 0.0
        x_flat = flat(tensor)
        for span in spans(tensor.numel()):
            d = (x_flat[span].to(dtype) - b_flat[span].to(dtype)).abs_()
            before += float(d.sum(dtype=torch.float64))
            after += float((d * thr.mask(d, span)).sum(dtype=torch.float64))
        factors.append(before / after if before >= eps and after >= eps else 1.0)
    return factors
