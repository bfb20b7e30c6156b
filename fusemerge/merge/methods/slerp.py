"""Spherical linear interpolation between the base and one other model, as mergekit's `slerp`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fusemerge.merge.kernels.chunks import compute_dtype, flat, new_output, spans
from fusemerge.merge.kernels.views import kernel_view, use_kernels
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param

DOT_THRESHOLD = 0.9995
EPS = 1e-8
SLERP_CHUNK = 1024 * 1024
GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: below it torch reduces serially


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

    Nearly collinear tensors (|cos| > 0.9995) fall back to linear interpolation. On the CPU in float32
    the elementwise work runs in numba kernels (`merge/kernels/slerp.py`) and, when both inputs are
    bf16, the result is written in bf16 directly (rounded once, as the engine's cast would); the
    reductions stay torch's in either case, so both paths give the same bits.
    """
    (other,) = tensors
    dtype = compute_dtype([base, other])
    a, b = flat(base), flat(other)
    # Same chunking and float32 scalar arithmetic as mergekit, so float32 recipes agree to the last bit or
    # two: near-collinear tensors make acos amplify any difference in the dot product.
    chunks = list(spans(a.numel(), SLERP_CHUNK))
    if not chunks:
        return torch.empty(base.shape, dtype=dtype, device=base.device)
    native = use_kernels(base, dtype) and other.device.type == "cpu"
    if native:
        return _slerp_native(a, b, base.shape, chunks, t)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[s].to(dtype)) for s in chunks]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[s].to(dtype)) for s in chunks]))
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    dot = torch.stack([((a[s].to(dtype) / norm_a) * (b[s].to(dtype) / norm_b)).sum() for s in chunks])
    coef_a, coef_b = _coefficients(dot, t, dtype, base.device)
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    out_flat = flat(out)
    for s in chunks:
        out_flat[s] = coef_a * a[s].to(dtype) + coef_b * b[s].to(dtype)
    return out


def _coefficients(
    dot_parts: torch.Tensor, t: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef_a, coef_b) from the per-chunk dot products, in mergekit's float32 scalar arithmetic."""
    dot = dot_parts.sum().clamp(-1, 1)
    t_ = torch.tensor(t, dtype=dtype, device=device)
    if float(dot.abs()) > DOT_THRESHOLD:
        return 1 - t_, t_
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t_) * theta) / sin_theta, torch.sin(t_ * theta) / sin_theta


def _slerp_native(
    a: torch.Tensor, b: torch.Tensor, shape: torch.Size, chunks: list[slice], t: float
) -> torch.Tensor:
    """The CPU float32 path: each input element widened once per pass into one reused float32 buffer
    that torch reduces (the values and the reductions of the torch path, so the same bits), and the
    interpolation in one kernel loop writing the result in its dtype."""
    from fusemerge.merge.kernels import slerp as kernels

    buf = torch.empty(min(SLERP_CHUNK, a.numel()), dtype=torch.float32)
    buf_np = buf.numpy()

    def chunk_norm(x: torch.Tensor, s: slice) -> torch.Tensor:
        if x.dtype == torch.float32:  # `.to(float32)` would be the tensor itself
            return torch.linalg.vector_norm(x[s])
        n = s.stop - s.start
        kernels.widen(kernel_view(x[s]), buf_np[:n])
        return torch.linalg.vector_norm(buf[:n])

    norm_a = torch.linalg.vector_norm(torch.stack([chunk_norm(a, s) for s in chunks]))
    norm_b = torch.linalg.vector_norm(torch.stack([chunk_norm(b, s) for s in chunks]))
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    na, nb = np.float32(norm_a.item()), np.float32(norm_b.item())
    threads = torch.get_num_threads()
    parts = []
    torch.set_num_threads(1)  # see `torch_sum`: its parts are summed serially (this thread's setting)
    try:
        for s in chunks:
            n = s.stop - s.start
            kernels.normalized_product(kernel_view(a[s]), kernel_view(b[s]), na, nb, buf_np[:n])
            parts.append(torch_sum(buf[:n], threads))
    finally:
        torch.set_num_threads(threads)
    coef_a, coef_b = _coefficients(torch.stack(parts), t, torch.float32, a.device)
    out_dtype = torch.bfloat16 if a.dtype == b.dtype == torch.bfloat16 else torch.float32
    out = new_output(shape, out_dtype, a.device)
    out_np = kernel_view(flat(out))
    ca, cb = np.float32(coef_a.item()), np.float32(coef_b.item())
    for s in chunks:
        kernels.interpolate(kernel_view(a[s]), kernel_view(b[s]), ca, cb, out_np[s])
    return out


def torch_sum(x: torch.Tensor, threads: int) -> torch.Tensor:
    """`x.sum()` of a contiguous float32 tensor as torch computes it with `threads` intra-op threads, to the
    bit, computed with one thread (the caller sets it).

    A full reduction over more than GRAIN_SIZE elements is torch's two-pass reduction: the range is cut
    into min(threads, ceil(n / GRAIN_SIZE)) equal parts, each summed serially into a slot of a
    `threads`-long zeroed buffer, and the buffer is summed; so the bits depend on the thread count, and
    mergekit's chunk dot products are those of its default thread count. Run as torch does it, each
    1M-element sum waited about 12 ms on the thread pool's hand-off on a loaded 2-core machine (0.05 ms
    serially): 4.5 s of 10.8 s at 337M parameters. Tested equal to `x.sum()` for 1 to 16 threads.
    """
    n = x.numel()
    if n < GRAIN_SIZE or threads <= 1:
        return x.sum()
    used = min(threads, -(-n // GRAIN_SIZE))
    step = -(-n // used)
    slots = torch.zeros(threads, dtype=x.dtype)
    slots[: -(-n // step)] = torch.stack([x[start : start + step].sum() for start in range(0, n, step)])
    return slots.sum()
