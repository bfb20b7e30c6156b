"""Elementwise work in bounded chunks.

Merging a 65M-element embedding in float32 needs several full-size temporaries if written naively; doing
the elementwise part over flat slices of a few million elements keeps the temporaries small, so peak memory
stays near the size of the inputs themselves whatever the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from math import prod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

CHUNK_ELEMENTS = 1 << 22
_TAKE_OUTPUT: ContextVar[Callable[[int], torch.Tensor] | None] = ContextVar(
    "fusemerge_take_output", default=None
)


@contextmanager
def outputs_from(take: Callable[[int], torch.Tensor]) -> Iterator[None]:
    """Within the block, `new_output` takes CPU result memory from `take(nbytes)` (a uint8 buffer): the
    engine lends reused buffers, as fresh memory costs a page fault per 4 KiB (see merge/buffers.py)."""
    token = _TAKE_OUTPUT.set(take)
    try:
        yield
    finally:
        _TAKE_OUTPUT.reset(token)


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised result tensor: `torch.empty`, or on the CPU memory lent by `outputs_from`."""
    import torch

    take = _TAKE_OUTPUT.get()
    if take is None or torch.device(device).type != "cpu":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return take(prod(shape) * dtype.itemsize).view(dtype).reshape(tuple(shape))


def compute_dtype(tensors: Sequence[torch.Tensor | None]) -> torch.dtype:
    import torch

    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def spans(numel: int, chunk: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    for start in range(0, numel, chunk):
        yield slice(start, min(numel, start + chunk))


def blocks(rows: int, cols: int, chunk: int = CHUNK_ELEMENTS) -> list[tuple[slice, slice]]:
    """(row range, column range) blocks of a rows x cols view, about `chunk` elements each.

    Several rows go whole into a block; a single row (a flattened tensor) is cut along its columns. Row-wise
    reductions then sum a row's per-block partial results.
    """
    if rows <= 1:
        return [(slice(0, 1), slice(s, min(cols, s + chunk))) for s in range(0, max(cols, 1), chunk)]
    step = max(1, chunk // max(cols, 1))
    return [(slice(r, min(rows, r + step)), slice(0, cols)) for r in range(0, rows, step)]


def rows_view(t: torch.Tensor, mode: str) -> torch.Tensor:
    """The tensor as a 2-D matrix of the vectors a spherical method works on.

    mode "flat": one row holding every element; "last": rows along the last dimension (a 1-D tensor is one
    row); "first": vectors along dim 0 (the tensor's dim 0 and last dim swapped, then rows along the last).
    """
    if mode == "flat" or t.dim() <= 1:
        return t.reshape(1, -1)
    if mode == "last":
        return t.reshape(-1, t.shape[-1])
    moved = t.transpose(0, -1)
    return moved.reshape(-1, moved.shape[-1])


def from_rows(rows: torch.Tensor, like: torch.Tensor, mode: str) -> torch.Tensor:
    """Inverse of `rows_view`."""
    if mode == "flat" or like.dim() <= 1 or mode == "last":
        return rows.reshape(like.shape)
    moved_shape = like.transpose(0, -1).shape
    return rows.reshape(moved_shape).transpose(0, -1).contiguous()


def weighted_sum(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[float], divide_by: float = 1.0
) -> torch.Tensor:
    """sum_j c_j * x_j / divide_by, accumulated in float32 (float64 for float64 inputs), chunk by chunk.

    On the CPU in float32 the numba kernel reads bf16 inputs in place and, when every input is bf16,
    writes the bf16 result directly (rounded once, as the engine's cast would); elsewhere torch.
    """
    import torch

    from fusemerge.merge.kernels import cpu as kernels
    from fusemerge.merge.kernels.views import kernel_view

    dtype = compute_dtype(tensors)
    first = tensors[0]
    native = first.device.type == "cpu" and dtype == torch.float32
    out_dtype = torch.bfloat16 if native and all(t.dtype == torch.bfloat16 for t in tensors) else dtype
    out = new_output(first.shape, out_dtype, first.device)
    out_flat, inputs = flat(out), [flat(t) for t in tensors]
    if native and len({t.dtype for t in inputs}) == 1:  # one dtype: the chunks go to numba as one tuple
        out_np, coefs = kernel_view(out_flat), np.array(coefficients, dtype=np.float32)
        for span in spans(out.numel()):
            xs = tuple(kernel_view(x[span]) for x in inputs)
            kernels.weighted_tuple(xs, coefs, np.float32(divide_by), out_np[span])
        return out
    if native:
        out_np = kernel_view(out_flat)
        acc = np.empty(min(CHUNK_ELEMENTS, out.numel()), dtype=np.float32)
        for span in spans(out.numel()):
            n = span.stop - span.start
            for j, (x, c) in enumerate(zip(inputs, coefficients, strict=True)):
                kernels.weighted_into(kernel_view(x[span]), np.float32(c), acc[:n], j == 0)
            kernels.store_scaled(acc[:n], np.float32(divide_by), out_np[span])
        return out
    for span in spans(out.numel()):
        acc_t = out_flat[span]
        acc_t.copy_(inputs[0][span]).mul_(coefficients[0])
        for x, c in zip(inputs[1:], coefficients[1:], strict=True):
            acc_t.add_(x[span].to(dtype), alpha=c)
        if divide_by != 1.0:
            acc_t.div_(divide_by)
    return out
