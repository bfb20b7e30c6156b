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
from typing import cast

from fusemerge.merge.kernels.chunks import CHUNK_ELEMENTS, compute_dtype, flat, new_output, spans
from fusemerge.merge.kernels.combine import fused_combine
from fusemerge.merge.kernels.views import use_kernels
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param
from fusemerge.merge.sparsify import NONE_KEPT, Keep, Mask, RandomKeep, kernel_masks, top_k_delta

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
    return top_k_delta(tensor, base, max(1, int(density * n)))


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
    """base + lambda * (normalised) sum of weighted, sparsified, optionally sign-agreeing task vectors.

    Written for memory traffic: each chunk's deltas go through one reused buffer (task arithmetic) or one
    buffer per model (TIES, whose sign vote needs them all), with in-place updates of the output chunk.
    """
    dtype = compute_dtype([*tensors, base])
    fused = use_kernels(base, dtype) and all(
        k is None or isinstance(k, Keep | RandomKeep) for k in thresholds
    )
    inputs, b_flat = [flat(t) for t in tensors], flat(base)
    if fused:
        # One pass per sparsified model draws DARE's mask (packed bits, read by every later pass) and
        # sums the L1 norms `rescale` needs; magnitude masks are thresholds already.
        held = kernel_masks(inputs, b_flat, cast(Sequence[Mask | None], thresholds), norms=rescale)
        scales = (
            [_l1_factor(*pair) for pair in held.norms] if held.norms is not None else [1.0] * len(tensors)
        )
    else:
        scales = rescale_factors(tensors, base, thresholds, dtype) if rescale else [1.0] * len(tensors)
    coefficients = [w * s for w, s in zip(weight, scales, strict=True)]
    # The fused kernels write bf16 results directly (rounded once, as the engine's cast would), sparing
    # a float32 copy of the whole tensor; elsewhere the result is float32.
    out_dtype = (
        torch.bfloat16 if fused and all(t.dtype == torch.bfloat16 for t in [*tensors, base]) else dtype
    )
    out = new_output(base.shape, out_dtype, base.device)
    out_flat = flat(out)
    total = sum(weight)
    scale = lambda_ / (total if abs(total) >= 1e-8 else 1.0) if normalize else lambda_
    if fused:
        fused_combine(
            inputs,
            b_flat,
            out_flat,
            (held.keep_above, held.last_tied, held.bits),
            coefficients,
            weight,
            consensus,
            normalize,
            lambda_,
        )
        return out
    buffer = torch.empty(min(CHUNK_ELEMENTS, out.numel()), dtype=dtype, device=base.device)
    for span in spans(out.numel()):
        acc = out_flat[span]
        b = b_flat[span].to(dtype)
        if not consensus:
            acc.zero_()
            for x, c, keep in zip(inputs, coefficients, thresholds, strict=True):
                d = torch.sub(x[span], b, out=buffer[: acc.numel()])
                if keep is not None:
                    d.mul_(keep.mask(d.abs(), span))
                acc.add_(d, alpha=c)
            acc.mul_(scale).add_(b)
            continue
        deltas = []
        for x, c, keep in zip(inputs, coefficients, thresholds, strict=True):
            d = x[span].to(dtype) - b
            if keep is not None:
                d.mul_(keep.mask(d.abs(), span))
            deltas.append(d.mul_(c))
        vote = torch.sub(deltas[0], 0, out=buffer[: acc.numel()])
        for d in deltas[1:]:
            vote.add_(d)
        positive = vote >= 0  # the elected sign: + where the summed mass is >= 0 (mergekit's rule)
        acc.zero_()
        divisor = vote.zero_()
        for d, w in zip(deltas, weight, strict=True):
            agree = torch.where(positive, d > 0, d < 0)
            acc.add_(d.mul_(agree))
            divisor.add_(agree, alpha=w)
        if normalize:
            acc.div_(divisor.masked_fill_(divisor == 0, 1))
        acc.mul_(lambda_).add_(b)
    return out


def rescale_factors(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, thresholds: Sequence[Mask | None], dtype: torch.dtype
) -> list[float]:
    """L1 norm before / after sparsification, per model (1 where nothing was dropped or norms vanish)."""
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
        factors.append(_l1_factor(before, after))
    return factors


def _l1_factor(before: float, after: float) -> float:
    """|delta|_1 / |kept delta|_1, or 1 where nothing was dropped or a norm vanishes."""
    eps = 1e-7
    return before / after if before >= eps and after >= eps else 1.0
