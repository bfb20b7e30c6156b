"""Spherical linear interpolation between the base and one other model, as mergekit's `slerp`."""

from __future__ import annotations

from collections.abc import Sequence

from fusemerge.merge.kernels.chunks import compute_dtype, flat, spans
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param

DOT_THRESHOLD = 0.9995
EPS = 1e-8
SLERP_CHUNK = 1024 * 1024


@merge_method(
    "slerp",
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    base="required",
    min_models=1,
    max_models=1,
    shared={"t": Param(float, doc="0 = base, 1 = the other model")},
)
def slerp(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Interpolate along the great circle between two weight tensors (Shoemake 1985).

    Nearly collinear tensors (|cos| > 0.9995) fall back to linear interpolation.
    """
    (other,) = tensors
    dtype = compute_dtype([base, other])
    a, b = flat(base), flat(other)
    # Same chunking and float32 scalar arithmetic as mergekit, so float32 recipes agree to the last bit or
    # two: near-collinear tensors make acos amplify any difference in the dot product.
    chunks = list(spans(a.numel(), SLERP_CHUNK))
    if not chunks:
        return torch.empty(base.shape, dtype=dtype, device=base.device)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[s].to(dtype)) for s in chunks]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[s].to(dtype)) for s in chunks]))
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    dot = torch.stack([((a[s].to(dtype) / norm_a) * (b[s].to(dtype) / norm_b)).sum() for s in chunks])
    dot = dot.sum().clamp(-1, 1)
    t_ = torch.tensor(t, dtype=dtype, device=base.device)
    if float(dot.abs()) > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t_) * theta) / sin_theta
        coef_b = torch.sin(t_ * theta) / sin_theta
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    out_flat = flat(out)
    for s in chunks:
        out_flat[s] = coef_a * a[s].to(dtype) + coef_b * b[s].to(dtype)
    return out
