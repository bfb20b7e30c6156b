"""Which elements of a task vector survive sparsification, as objects that answer chunk by chunk.

`_combine` in task arithmetic walks a tensor in flat chunks and asks each model's mask `mask(magnitudes,
span)` for a boolean chunk. Magnitude masks (TIES, breadcrumbs) are thresholds found by k-th value
selection, so they cost no memory per element; random masks (DARE) draw each chunk from a generator
seeded by the tensor's seed and the chunk's offset, so asking twice (once for the rescale factor, once
for the merge) gives the same mask without storing it, in any order and on any device; DELLA's rank-dependent masks need
whole rows, so they are drawn once and held as one byte per element.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch

from fusemerge.merge.methods.chunks import CHUNK_ELEMENTS, compute_dtype, flat, spans


class Mask(Protocol):
    def mask(self, magnitudes: torch.Tensor, span: slice) -> torch.Tensor: ...


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, tensor name, model index, chunk offset)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def uniform(seed: int, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """U[0, 1) draws from a CPU generator, moved to `device`: the same seed gives the same draws on a
    CPU or a GPU merge (CUDA generators produce other streams)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen).to(device)


@dataclass(frozen=True)
class Keep:
    """Which elements a top-k magnitude selection keeps: |delta| > threshold, plus those equal to it up
    to flat index `last_tied` (so exactly k are kept, ties going to the lowest indices)."""

    threshold: float
    last_tied: int

    def mask(self, magnitudes: torch.Tensor, span: slice) -> torch.Tensor:
        keep = magnitudes > self.threshold
        if self.last_tied >= span.start:
            index = torch.arange(span.start, span.stop, device=magnitudes.device)
            keep |= (magnitudes == self.threshold) & (index <= self.last_tied)
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
