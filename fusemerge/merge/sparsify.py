"""Sparsification: which elements of a task vector survive, as masks that answer chunk by chunk.

Kept apart from the methods, as mergekit keeps its `sparsify.py`: TIES, breadcrumbs, DARE, DELLA and SCE
all use these. `combine` in task arithmetic walks a tensor in flat chunks and asks each model's mask
`mask(magnitudes, span)` for a boolean chunk. Magnitude masks (TIES, breadcrumbs) are thresholds found by
k-th value selection, so they cost no memory per element; random masks (DARE) draw each chunk from a
generator seeded by the tensor's seed and the chunk's offset, so asking twice (once for the rescale
factor, once for the merge) gives the same mask without storing it, in any order and on any device;
DELLA's rank-dependent masks need whole rows, so they are drawn once and held as one byte per element.
The random masks take the tensor's seed from the engine (see `fusemerge.merge.seeds`) and derive the
per-model and per-chunk seeds here, so the methods never derive one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fusemerge.merge.kernels import cpu as kernels
from fusemerge.merge.kernels.chunks import CHUNK_ELEMENTS, compute_dtype, flat, spans
from fusemerge.merge.kernels.views import kernel_view, use_kernels
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.seeds import derive_seed, uniform


class Mask(Protocol):
    def mask(self, magnitudes: torch.Tensor, span: slice) -> torch.Tensor: ...


@dataclass(frozen=True)
class Keep:
    """Which elements a top-k magnitude selection keeps: |delta| > threshold, plus those equal to it up
    to flat index `last_tied` (so exactly k are kept, ties going to the lowest indices)."""

    threshold: float
    last_tied: int

    def mask(self, magnitudes: torch.Tensor, span: slice) -> torch.Tensor:
        if self.last_tied < span.start:
            return magnitudes > self.threshold
        if self.last_tied >= span.stop - 1:
            return magnitudes >= self.threshold
        keep = magnitudes > self.threshold
        cut = self.last_tied + 1 - span.start
        keep[:cut] |= magnitudes[:cut] == self.threshold
        return keep


NONE_KEPT = Keep(float("inf"), -1)


@dataclass(frozen=True)
class Band:
    """The top `outer` magnitudes minus the top `inner` ones: model breadcrumbs drop both the smallest
    deltas and the largest outliers. Both selections break ties towards low indices, so inner is a subset
    of outer."""

    outer: Keep
    inner: Keep | None

    def mask(self, magnitudes: torch.Tensor, span: slice) -> torch.Tensor:
        keep = self.outer.mask(magnitudes, span)
        if self.inner is not None:
            keep &= ~self.inner.mask(magnitudes, span)
        return keep


@dataclass(frozen=True)
class RandomKeep:
    """Keep each element with probability `density` (DARE's Bernoulli mask), drawn per chunk."""

    seed: int
    density: float

    def mask(self, magnitudes: torch.Tensor, span: slice) -> torch.Tensor:
        return uniform(derive_seed(self.seed, span.start), magnitudes.shape, magnitudes.device) < self.density


@dataclass(frozen=True)
class KernelMasks:
    """Masks as the fused kernels read them, per model: a magnitude threshold and the last kept tie
    (-1 and -1 keep everything), or for DARE a packed bit per element (bit i & 7 of byte i >> 3), drawn
    once per tensor so the rescale pass and the merge's passes read the same draws without redrawing;
    with each model's L1 norms (before, after) when `rescale` asked for them."""

    keep_above: np.ndarray
    last_tied: np.ndarray
    bits: list[np.ndarray | None]
    norms: list[tuple[float, float]] | None


def kernel_masks(
    inputs: Sequence[torch.Tensor], b_flat: torch.Tensor, masks: Sequence[Mask | None], *, norms: bool
) -> KernelMasks:
    """The kernels' form of `masks` (each None, a `Keep` or a `RandomKeep`) over flat inputs: one pass
    per random mask (draw, pack, and the norms), one per magnitude mask when `norms` is asked for."""
    keep_above = np.full(len(masks), -1.0, dtype=np.float32)
    last_tied = np.full(len(masks), -1, dtype=np.int64)
    bits: list[np.ndarray | None] = [None] * len(masks)
    totals: list[tuple[float, float]] = []
    n = b_flat.numel()
    for j, (x_flat, keep) in enumerate(zip(inputs, masks, strict=True)):
        if isinstance(keep, Keep):
            keep_above[j], last_tied[j] = keep.threshold, keep.last_tied
        elif isinstance(keep, RandomKeep):
            bits[j] = np.zeros((n + 7) // 8, dtype=np.uint8)
        before = after = 0.0
        if keep is not None and (norms or isinstance(keep, RandomKeep)):
            for span, x, b in _chunks(x_flat, b_flat):
                if isinstance(keep, RandomKeep):  # RandomKeep.mask's draws, made in the kernel
                    seed = derive_seed(keep.seed, span.start)
                    one = kernels.draw_kept_seeded(x, b, seed, np.float32(keep.density), bits[j], span.start)
                else:
                    tie = last_tied[j] - span.start
                    one = kernels.kept_norms(x, b, keep_above[j], tie)
                before, after = before + one[0], after + one[1]
        totals.append((before, after))
    return KernelMasks(keep_above, last_tied, bits, totals if norms else None)


@dataclass(frozen=True)
class HeldMask:
    """A mask computed whole (DELLA) and held as a flat boolean tensor."""

    keep: torch.Tensor

    def mask(self, magnitudes: torch.Tensor, span: slice) -> torch.Tensor:
        return self.keep[span]


def magnitudes(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|tensor - base| as a flat float32 (float64) tensor, computed chunk by chunk."""
    n = tensor.numel()
    dtype = compute_dtype([tensor, base])
    out = torch.empty(n, dtype=dtype, device=tensor.device)
    t_flat, b_flat = flat(tensor), flat(base)
    for span in spans(n):
        torch.sub(t_flat[span].to(dtype), b_flat[span].to(dtype), out=out[span]).abs_()
    return out


def top_k(values: torch.Tensor, k: int) -> Keep:
    """The k largest of a flat tensor by a k-th value search (O(n)), ties to the lowest indices."""
    n = values.numel()
    if k <= 0 or n == 0:
        return NONE_KEPT
    k = min(k, n)
    threshold = torch.kthvalue(values, n - k + 1).values
    above = int((values > threshold).sum())
    tied = (values == threshold).nonzero().flatten()
    last_tied = int(tied[k - above - 1]) if k > above else -1
    return Keep(float(threshold), last_tied)


def top_k_delta(tensor: torch.Tensor, base: torch.Tensor, k: int) -> Keep:
    """The k largest |tensor - base|: a radix select on the CPU (no whole-tensor temporaries), else
    `top_k` over the magnitudes."""
    n = tensor.numel()
    if k <= 0 or n == 0:
        return NONE_KEPT
    k = min(k, n)
    if use_kernels(tensor, compute_dtype([tensor, base])):
        return _radix_keep(flat(tensor), flat(base), k)
    return top_k(magnitudes(tensor, base), k)


def _chunks(t_flat: torch.Tensor, b_flat: torch.Tensor):
    for span in spans(t_flat.numel()):
        yield span, kernel_view(t_flat[span]), kernel_view(b_flat[span])


def _radix_keep(t_flat: torch.Tensor, b_flat: torch.Tensor, k: int) -> Keep:
    """Exact top-k selection by the bits of |delta|: non-negative floats order like their bit patterns,
    so two 16-bit histogram passes find the k-th largest value, and a third (only when the threshold is
    tied) finds where the kept ties end."""
    hist = np.zeros(kernels.HI_BINS, dtype=np.int64)
    for _, x, b in _chunks(t_flat, b_flat):
        kernels.histogram_hi(x, b, hist)

    def low_pass(top: np.uint32, low_hist: np.ndarray) -> None:
        for _, x, b in _chunks(t_flat, b_flat):
            kernels.histogram_lo(x, b, top, low_hist)

    def tie_pass():
        for span, x, b in _chunks(t_flat, b_flat):
            yield lambda bits, wanted, span=span, x=x, b=b: kernels.tie_index(x, b, bits, wanted, span.start)

    return _radix_finish(hist, k, t_flat.numel(), low_pass, tie_pass)


def variance_keep(chunks, n: int, topk: float) -> Keep:
    """SCE's selection: the top int(nonzero * topk) per-element variances across models (`chunks()`
    yields (span, models' chunk views, base chunk view)), ties to the lowest indices as `top_k` breaks
    them, by the same radix select over the variance's bits."""
    from fusemerge.merge.kernels import sce as sce_kernels

    hist = np.zeros(kernels.HI_BINS, dtype=np.int64)
    nonzero = sum(sce_kernels.variance_histogram_hi(xs, b, hist) for _, xs, b in chunks())
    k = int(nonzero * topk)
    if k <= 0:
        return NONE_KEPT

    def low_pass(top: np.uint32, low_hist: np.ndarray) -> None:
        for _, xs, b in chunks():
            sce_kernels.variance_histogram_lo(xs, b, top, low_hist)

    def tie_pass():
        for span, xs, b in chunks():
            yield lambda bits, wanted, span=span, xs=xs, b=b: sce_kernels.variance_tie_index(
                xs, b, bits, wanted, span.start
            )

    return _radix_finish(hist, min(k, n), n, low_pass, tie_pass)


def _radix_finish(hist: np.ndarray, k: int, n: int, low_pass, tie_pass) -> Keep:
    """From the high-bits histogram, the low-bits pass and (when the threshold is tied) the tie pass."""
    top, above = _bin_holding(hist, k)
    hist[:] = 0
    low_pass(np.uint32(top), hist)
    low, above_low = _bin_holding(hist, k - above)
    above += above_low
    bits = np.uint32((top << 16) | low)
    threshold = float(bits.view(np.float32))
    wanted = k - above  # how many elements equal to the threshold are kept, lowest indices first
    if wanted == hist[low]:
        return Keep(threshold, n)
    for find in tie_pass():
        found = find(bits, wanted)
        if found >= 0:
            return Keep(threshold, int(found))
        wanted -= -found - 1
    raise AssertionError("tie count changed between passes")


def _bin_holding(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    from_top = np.cumsum(hist[::-1])
    index = int(np.searchsorted(from_top, k))
    return len(hist) - 1 - index, int(from_top[index - 1]) if index > 0 else 0


def della_mask(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> HeldMask:
    """DELLA's MagPrune: keep probability rises linearly with a delta's magnitude rank in its row, from
    density - epsilon (smallest) to density + epsilon (largest). Rows are along dim 1 (a 1-D tensor is
    one row), as mergekit ranks them; rank ties go to the lower index (stable sort)."""
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    moved = x.movedim(1, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    ncols = rows.shape[1]
    keep = torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
    step = max(1, CHUNK_ELEMENTS // max(1, ncols))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].abs().float()
        ranks = torch.argsort(torch.argsort(block, dim=1, stable=True), dim=1).float()
        rank_norm = ranks / (ncols - 1) if ncols > 1 else torch.zeros_like(ranks)
        probs = (density - epsilon) + rank_norm * 2 * epsilon
        keep[start : start + step] = uniform(derive_seed(seed, start), probs.shape, delta.device) < probs
    keep = keep.reshape(moved.shape).movedim(-1, 1)
    return HeldMask(keep.reshape(delta.shape).contiguous().reshape(-1))


def dare_masks(n_models: int, density: list[float], seed: int) -> list[Mask | None]:
    """DARE's Bernoulli masks, one per model (None where `density` keeps everything)."""
    return [None if d >= 1 else RandomKeep(derive_seed(seed, j), d) for j, d in enumerate(density[:n_models])]


def della_masks(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, density: list[float], epsilon: list[float], seed: int
) -> list[Mask | None]:
    """DELLA's MagPrune masks, one per model (None keeps everything, NONE_KEPT drops everything)."""
    masks: list[Mask | None] = []
    for j, (t, d, e) in enumerate(zip(tensors, density, epsilon, strict=True)):
        if d >= 1:
            masks.append(None)
        elif d <= 0:
            masks.append(NONE_KEPT)
        else:
            delta = t.float() - base.float() if t.dtype != torch.float64 else t - base
            masks.append(della_mask(delta, d, e, derive_seed(seed, j)))
            del delta
    return masks


def breadcrumb_mask(tensor: torch.Tensor, base: torch.Tensor, density: float, gamma: float) -> Mask | None:
    """Model breadcrumbs' band, as mergekit's magnitude_outliers: sorted ascending, keep the ranks
    [n_bot, n_bot + int(density * n)), dropping the `gamma` fraction of largest magnitudes first."""
    if density >= 1:
        return None
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    if target <= 0 or n == 0:
        return NONE_KEPT
    mags = magnitudes(tensor, base)
    outer = top_k(mags, n - n_bot)
    dropped_top = n - n_bot - target
    inner = top_k(mags, dropped_top) if dropped_top > 0 else None
    return Band(outer, inner)
