"""RAM and RAM+ (tensor-local): Reinforced Agent Merging, as mergekit's `ram` and `ramplus_tl`.

Each element's task-vector entries count as contributions where |delta| > epsilon. An element changed by
one model takes that model's delta; an element changed by several takes their mean (rather than their
sum, which over-counts shared updates). RAM+ also amplifies each model's unique deltas by
1 + r * min(alpha, shared / unique), its count of shared over unique elements in this tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusemerge.merge.kernels.chunks import compute_dtype, flat, spans
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param

RAM_URL = "https://arxiv.org/abs/2601.13572"
EPSILON = {"epsilon": Param(float, 1e-5, "a delta counts as a contribution where |delta| > epsilon")}


def _chunk(inputs: list[torch.Tensor], b: torch.Tensor, s: slice, dtype: torch.dtype, epsilon: float):
    base = b[s].to(dtype)
    tv = torch.stack([x[s].to(dtype) - base for x in inputs])
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return base, tv * nonzero, nonzero, counts


def _ram(tensors, base, epsilon: float, lambdas: torch.Tensor | None) -> torch.Tensor:
    dtype = compute_dtype([*tensors, base])
    inputs, b = [flat(t) for t in tensors], flat(base)
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    out_flat = flat(out)
    for s in spans(out.numel()):
        base_chunk, tv, _, counts = _chunk(inputs, b, s, dtype, epsilon)
        unique = (counts == 1).to(dtype)
        overlap = (counts > 1).to(dtype)
        scaled = tv * unique if lambdas is None else tv * unique * lambdas.to(dtype).unsqueeze(-1)
        merged = (scaled + tv * overlap / counts.clamp(min=1)).sum(dim=0)
        out_flat[s] = base_chunk + merged
    return out


@merge_method(
    "ram", pretty_name="Reinforced Agent Merging", reference_url=RAM_URL, base="required", shared=EPSILON
)
def ram(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """Unique deltas kept whole, shared deltas averaged over the models that made them (RAM, 2026)."""
    return _ram(tensors, base, epsilon, None)


@merge_method(
    "ramplus_tl",
    pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
    reference_url=RAM_URL,
    base="required",
    shared={
        "r": Param(float, 0.1, "amplification rate of unique deltas"),
        "alpha": Param(float, 0.2, "cap on the shared/unique ratio"),
        **EPSILON,
    },
)
def ramplus_tl(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, *, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """RAM with each model's unique deltas amplified by its shared/unique ratio in the tensor (RAM+, 2026)."""
    dtype = compute_dtype([*tensors, base])
    inputs, b = [flat(t) for t in tensors], flat(base)
    shared = torch.zeros(len(inputs), dtype=torch.int64, device=base.device)
    unique = torch.zeros_like(shared)
    for s in spans(base.numel()):
        _, _, nonzero, counts = _chunk(inputs, b, s, dtype, epsilon)
        shared += (nonzero & (counts > 1)).sum(dim=1)
        unique += (nonzero & (counts == 1)).sum(dim=1)
    rho = shared.to(dtype) / unique.to(dtype).clamp(min=epsilon)
    lambdas = 1 + r * rho.clamp(min=0, max=alpha)
    return _ram(tensors, base, epsilon, lambdas)
