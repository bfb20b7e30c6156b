"""SCE (Select, Calculate, Erase): FuseChat 2.0's merge of target models' task vectors, as mergekit's `sce`.

Select keeps the `select_topk` fraction of elements where the task vectors vary most across models;
Calculate weights each model by the mean square of its (selected) task vector; Erase drops, per element,
the deltas whose sign disagrees with the sum's. With `select_topk: 1` and no sign conflicts, SCE is VaRM.
The selection is a k-th value search over the per-element variance (ties to the lowest indices) and the
sums run in float32 chunks; mergekit uses topk and computes in the recipe's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fusemerge.merge.kernels import sce as sce_kernels
from fusemerge.merge.kernels.chunks import compute_dtype, flat, new_output, spans
from fusemerge.merge.kernels.views import kernel_view, use_kernels
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param
from fusemerge.merge.sparsify import NONE_KEPT, Keep, top_k, variance_keep


def _deltas(inputs: list[torch.Tensor], b: torch.Tensor, span: slice, dtype: torch.dtype) -> torch.Tensor:
    base = b[span].to(dtype)
    return torch.stack([x[span].to(dtype) - base for x in inputs])


def _select(
    inputs: list[torch.Tensor], b: torch.Tensor, n: int, topk: float, dtype: torch.dtype
) -> Keep | None:
    if topk >= 1:
        return None
    if topk <= 0:
        return NONE_KEPT
    var = torch.empty(n, dtype=dtype, device=b.device)
    for span in spans(n):
        var[span] = torch.var(_deltas(inputs, b, span, dtype), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * topk)
    return top_k(var.abs_(), k) if k > 0 else NONE_KEPT


@merge_method(
    "sce",
    pretty_name="SCE",
    reference_url="https://arxiv.org/abs/2408.07990",
    base="required",
    shared={
        "int8_mask": Param(bool, False, "store masks as int8 (memory only; same result)"),
        "select_topk": Param(float, 1.0, "fraction of elements kept, by variance across models"),
    },
)
def sce(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, *, int8_mask: bool, select_topk: float
) -> torch.Tensor:
    """Select high-variance elements, weight models by mean squared delta, erase sign conflicts (Wan et al. 2024)."""
    dtype = compute_dtype([*tensors, base])
    n = base.numel()
    inputs, b = [flat(t) for t in tensors], flat(base)
    if use_kernels(base, dtype) and len({t.dtype for t in tensors}) == 1:
        return _sce_kernels(inputs, b, base, select_topk)
    keep = _select(inputs, b, n, select_topk, dtype)

    squares = torch.zeros(len(inputs), dtype=torch.float64, device=base.device)
    for span in spans(n):
        d = _deltas(inputs, b, span, dtype)
        if keep is not None:
            d.mul_(_span_mask(keep, inputs, b, span, dtype))
        squares += d.square().sum(dim=1, dtype=torch.float64)
    weights = _weights(squares, n, dtype).unsqueeze(1)

    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    out_flat = flat(out)
    for span in spans(n):
        d = _deltas(inputs, b, span, dtype)
        if keep is not None:
            d.mul_(_span_mask(keep, inputs, b, span, dtype))
        majority = torch.where(d.sum(dim=0) >= 0, 1.0, -1.0).to(dtype)
        erased = weights * (d.sign() == majority)
        merged = (d * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
        out_flat[span] = b[span].to(dtype) + merged
    return out


def _weights(squares: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Each model's mean squared (selected) delta over their sum; uniform where all vanish."""
    means = squares / max(n, 1)
    total = float(means.sum())
    weights = (means / total) if abs(total) >= 1e-6 else torch.full_like(means, 1 / len(squares))
    return weights.to(dtype)


def _sce_kernels(
    inputs: list[torch.Tensor], b: torch.Tensor, base: torch.Tensor, topk: float
) -> torch.Tensor:
    """SCE by the numba kernels (CPU, float32 arithmetic): one pass per selection step (a radix select on
    the variance's bits, as `top_k` would pick), one for the weights, one to merge; bf16 written directly
    when every input is bf16 (rounded once, as the engine's cast would)."""
    n = b.numel()

    def chunks():
        for span in spans(n):
            yield span, tuple(kernel_view(x[span]) for x in inputs), kernel_view(b[span])

    keep = variance_keep(chunks, n, topk) if 0 < topk < 1 else (NONE_KEPT if topk <= 0 else None)
    select = keep is not None
    threshold = np.float32(keep.threshold if keep is not None else -1.0)
    last = keep.last_tied if keep is not None else -1
    squares = np.zeros(len(inputs), dtype=np.float64)
    for span, xs, bv in chunks():
        sce_kernels.selected_squares(xs, bv, select, threshold, last - span.start, squares)
    weights = _weights(torch.from_numpy(squares), n, torch.float32).numpy()
    bf16 = all(t.dtype == torch.bfloat16 for t in [*inputs, b])
    out = new_output(base.shape, torch.bfloat16 if bf16 else torch.float32, base.device)
    out_np = kernel_view(flat(out))
    for span, xs, bv in chunks():
        sce_kernels.erase_merge(xs, bv, select, threshold, last - span.start, weights, out_np[span])
    return out


def _span_mask(
    keep: Keep, inputs: list[torch.Tensor], b: torch.Tensor, span: slice, dtype: torch.dtype
) -> torch.Tensor:
    return keep.mask(torch.var(_deltas(inputs, b, span, dtype), dim=0, unbiased=False).abs_(), span)
