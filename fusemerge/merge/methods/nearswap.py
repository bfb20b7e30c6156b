"""NearSwap: take the other model's value where it is near the base's, as mergekit's `nearswap`."""

from __future__ import annotations

from collections.abc import Sequence

from fusemerge.merge.kernels.chunks import compute_dtype, flat, spans
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param


@merge_method(
    "nearswap",
    pretty_name="NearSwap",
    reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    base="required",
    min_models=1,
    max_models=1,
    shared={"t": Param(float, doc="similarity threshold: weight = clamp(t / |a - b|, 0, 1)")},
)
def nearswap(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Interpolate towards the other model by t / |difference|: near-equal values swap in (alchemonaut 2024)."""
    dtype = compute_dtype([*tensors, base])
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    a_flat, b_flat, out_flat = flat(base), flat(tensors[0]), flat(out)
    for s in spans(out.numel()):
        a, b = a_flat[s].to(dtype), b_flat[s].to(dtype)
        weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        out_flat[s] = weight * b + (1 - weight) * a
    return out
