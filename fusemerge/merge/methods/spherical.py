"""Spherical merges beyond two-model SLERP: NuSLERP, Multi-SLERP and the Karcher mean, as mergekit's.

- `nuslerp`: SLERP between two models (or their task vectors, given a base) with t = w2 / (w1 + w2),
  over the flattened tensor (default), its rows, or (`nuslerp_row_wise`) its columns.
- `multislerp`: barycentric interpolation on the hypersphere of any number of models (or task vectors):
  project onto the tangent space at the weighted mean direction, interpolate, map back, rescale by the
  weighted mean norm.
- `karcher`: the Riemannian (Karcher) mean of the models' directions by fixed-point iteration, scaled by
  their mean norm; `max_iter` and `tol` bound the iteration, which runs on whole tensors inside the
  method (it is still a pure function of its inputs, so the engine needs nothing new).

Reductions (norms, dots) run over bounded chunks in float32; the chunk partial results are combined the
way mergekit combines them where that matters for bit-level agreement.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusemerge.errors import FusemergeError
from fusemerge.merge.kernels.chunks import blocks, compute_dtype, flat, from_rows, rows_view, spans
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param


def _row_norms(x: torch.Tensor, parts, dtype, n_rows: int, sub: torch.Tensor | None = None) -> torch.Tensor:
    pieces = []
    for rs, cs in parts:
        v = x[rs, cs].to(dtype)
        if sub is not None:
            v = v - sub[rs, cs].to(dtype)
        pieces.append(torch.linalg.vector_norm(v, dim=-1))
    return torch.linalg.vector_norm(torch.cat(pieces)).reshape(1) if n_rows == 1 else torch.cat(pieces)


# -- NuSLERP ------------------------------------------------------------------------------------------
@merge_method(
    "nuslerp",
    pretty_name="NuSLERP",
    reference_url="https://github.com/arcee-ai/mergekit",
    base="optional",
    min_models=2,
    max_models=2,
    shared={
        "nuslerp_row_wise": Param(bool, False, "interpolate columns (dim 0 vectors) instead of rows"),
        "nuslerp_flatten": Param(bool, True, "interpolate the whole tensor as one vector"),
    },
    per_model={"weight": Param(float, doc="relative weight; t = w2 / (w1 + w2)")},
)
def nuslerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
) -> torch.Tensor:
    """SLERP of two models or task vectors with weights instead of t (mergekit's NuSLERP)."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dtype = compute_dtype([*tensors, base])
    mode = "flat" if nuslerp_flatten else ("first" if nuslerp_row_wise else "last")
    v0, v1 = (rows_view(x, mode) for x in tensors)
    b = rows_view(base, mode) if base is not None else None
    n_rows, n_cols = v0.shape
    parts = blocks(n_rows, n_cols)

    def vec(x: torch.Tensor, rs: slice, cs: slice) -> torch.Tensor:
        v = x[rs, cs].to(dtype)
        return v - b[rs, cs].to(dtype) if b is not None else v

    n0 = _row_norms(v0, parts, dtype, n_rows, b).clamp(min=1e-7).unsqueeze(-1)
    n1 = _row_norms(v1, parts, dtype, n_rows, b).clamp(min=1e-7).unsqueeze(-1)
    cos = torch.zeros(n_rows, 1, dtype=dtype, device=v0.device)
    for rs, cs in parts:
        cos[rs] += ((vec(v0, rs, cs) / n0[rs]) * (vec(v1, rs, cs) / n1[rs])).sum(dim=-1, keepdim=True)
    cos = cos.clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-8**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    c0, c1 = torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta

    out = torch.empty(v0.shape, dtype=dtype, device=v0.device)
    for rs, cs in parts:
        a, c = vec(v0, rs, cs), vec(v1, rs, cs)
        res = torch.where(colinear[rs], (1 - t) * a + t * c, c0[rs] * a + c1[rs] * c)
        out[rs, cs] = res + b[rs, cs].to(dtype) if b is not None else res
    return from_rows(out, tensors[0], mode)


# -- Multi-SLERP --------------------------------------------------------------------------------------
@merge_method(
    "multislerp",
    pretty_name="Multi-SLERP",
    reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    base="optional",
    shared={
        "normalize_weights": Param(bool, True, "divide the weights by their sum"),
        "eps": Param(float, 1e-8, "numerical floor for norms"),
    },
    per_model={"weight": Param(float, doc="the model's barycentric weight")},
)
def multislerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    """Weighted barycentre of several models (or task vectors) on the hypersphere (Goddard 2024)."""
    dtype = compute_dtype([*tensors, base])
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    n = tensors[0].numel()
    xs = [flat(t) for t in tensors]
    b = flat(base) if base is not None else None
    w = torch.tensor(weight, dtype=dtype)
    if normalize_weights:
        w = w / w.sum()
    ws = w.tolist()

    def delta(j: int, s: slice) -> torch.Tensor:
        v = xs[j][s].to(dtype)
        return v - b[s].to(dtype) if b is not None else v

    norms = [_flat_norm([delta(j, s) for s in spans(n)]) for j in range(len(xs))]
    mean = torch.zeros(n, dtype=dtype, device=tensors[0].device)
    for s in spans(n):
        for j in range(len(xs)):
            mean[s] += (delta(j, s) / (norms[j] + eps)) * ws[j]
    mean_norm = _flat_norm([mean[s] for s in spans(n)])
    if float(mean_norm) < eps:
        if len(xs) == 2:
            out = torch.empty(n, dtype=dtype, device=tensors[0].device)
            for s in spans(n):
                res = delta(0, s) * ws[0] + delta(1, s) * ws[1]
                out[s] = res + b[s].to(dtype) if b is not None else res
            return out.reshape(tensors[0].shape)
        raise FusemergeError(
            "multislerp: the weighted sum of the normalised inputs is zero (antipodal models with "
            "balancing weights); use different weights",
            key="parameters.weight",
        )
    mean.div_(mean_norm)
    dots = [
        sum(float(((delta(j, s) / (norms[j] + eps)) * mean[s]).sum()) for s in spans(n))
        for j in range(len(xs))
    ]

    def tangent(s: slice) -> torch.Tensor:
        acc = torch.zeros_like(mean[s])
        for j in range(len(xs)):
            acc += ((delta(j, s) / (norms[j] + eps)) - dots[j] * mean[s]) * ws[j]
        return acc

    tangent_norm = _flat_norm([tangent(s) for s in spans(n)]) + eps
    avg_norm = sum(float(nj) * wj for nj, wj in zip(norms, ws, strict=True))
    cos_t, sinc_t = torch.cos(tangent_norm), torch.sin(tangent_norm) / tangent_norm
    out = mean  # reuse the buffer: each chunk of the mean is read before it is overwritten
    for s in spans(n):
        res = (mean[s] * cos_t + tangent(s) * sinc_t) * avg_norm
        out[s] = res + b[s].to(dtype) if b is not None else res
    return out.reshape(tensors[0].shape)


def _flat_norm(pieces: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in pieces]))


# -- Karcher mean -------------------------------------------------------------------------------------
@merge_method(
    "karcher",
    pretty_name="Karcher Mean",
    reference_url="https://arxiv.org/abs/2603.04972",
    base="ignored",
    shared={
        "max_iter": Param(int, 10, "fixed-point iterations at most"),
        "tol": Param(float, 1e-5, "stop when the tangent step is shorter than this"),
    },
)
def karcher(tensors: Sequence[torch.Tensor], base: None, *, max_iter: int, tol: float) -> torch.Tensor:
    """Riemannian mean of the models' directions on the unit sphere, times their mean norm (Karcher 1977)."""
    dtype = compute_dtype(tensors)
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    alphas = [1.0 / len(tensors)] * len(tensors)
    xs = [flat(t) for t in tensors]
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in xs]

    def unit(j: int) -> torch.Tensor:
        return xs[j].to(dtype) / norms[j] if float(norms[j]) != 0.0 else torch.zeros_like(xs[j], dtype=dtype)

    valid = [j for j, nj in enumerate(norms) if float(nj) > tol]
    if not valid:
        return torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    alpha_sum = sum(alphas[j] for j in valid)
    weights = {j: alphas[j] / alpha_sum for j in valid}

    mean = torch.zeros_like(xs[0], dtype=dtype)
    for j in valid:
        mean += weights[j] * unit(j)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = unit(valid[0]) if float(mean_norm) < tol else mean / mean_norm

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for j in valid:
            u = unit(j)
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            step += weights[j] * (theta / torch.sin(theta)) * (u - dot * mean)
            del u
        step_norm = torch.linalg.vector_norm(step)
        if float(step_norm) < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(a * nj for a, nj in zip(alphas, norms, strict=True))
    return (scale * mean).reshape(tensors[0].shape)
