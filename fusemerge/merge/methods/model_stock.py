"""Model Stock: interpolate between the base and the average of fine-tunes by the angle between their
task vectors (Jang et al. 2024), as mergekit's `model_stock`.

With N fine-tunes and cos the mean pairwise cosine of their task vectors, t = N cos / (1 + (N - 1) cos)
and the result is t * average + (1 - t) * base. `filter_wise` computes one t per row (last dimension)
instead of one per tensor. Where 1 + (N - 1) cos vanishes the base is kept, as mergekit does.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusemerge.merge.kernels.chunks import blocks, compute_dtype, rows_view
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param


@merge_method(
    "model_stock",
    pretty_name="Model Stock",
    reference_url="https://arxiv.org/abs/2403.19522",
    base="required",
    min_models=2,
    shared={"filter_wise": Param(bool, False, "one interpolation ratio per row instead of per tensor")},
)
def model_stock(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """Move from the base towards the fine-tunes' average by a ratio set by their task vectors' angles (Jang et al. 2024)."""
    dtype = compute_dtype([*tensors, base])
    mode = "last" if filter_wise else "flat"
    b = rows_view(base, mode)
    xs = [rows_view(t, mode) for t in tensors]
    n_rows, n_cols = b.shape
    count = len(xs)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    parts = blocks(n_rows, n_cols)

    norm_parts: list[list[torch.Tensor]] = [[] for _ in range(count)]
    dots = torch.zeros(len(pairs), n_rows, dtype=dtype, device=base.device)
    for rs, cs in parts:
        w0 = b[rs, cs].to(dtype)
        offsets = [x[rs, cs].to(dtype) - w0 for x in xs]
        for i, o in enumerate(offsets):
            norm_parts[i].append(torch.linalg.vector_norm(o, dim=-1))
        for p, (i, j) in enumerate(pairs):
            dots[p, rs] += (offsets[i] * offsets[j]).sum(dim=-1)
    norms = [_join_norms(p, n_rows) for p in norm_parts]
    cos = torch.stack(
        [(dots[p] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for p, (i, j) in enumerate(pairs)]
    ).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, 1, denominator))
    t = t.unsqueeze(-1)

    out = torch.empty(b.shape, dtype=dtype, device=base.device)
    for rs, cs in parts:
        average = sum(x[rs, cs].to(dtype) for x in xs) / count
        out[rs, cs] = t[rs] * average + (1 - t[rs]) * b[rs, cs].to(dtype)
    return out.reshape(base.shape)


def _join_norms(parts: list[torch.Tensor], n_rows: int) -> torch.Tensor:
    """Per-row norms from per-block norms: blocks either hold whole rows or cut one row."""
    if n_rows == 1:
        return torch.linalg.vector_norm(torch.cat(parts))
    return torch.cat(parts)
