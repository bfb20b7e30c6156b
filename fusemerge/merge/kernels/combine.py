"""The fused CPU form of task arithmetic and TIES: sparsify, weight, elect signs and sum in a few loops.

`fusemerge.merge.methods.task_arithmetic.combine` calls this for CPU float32 work whose masks are all
magnitude thresholds; the torch path there is the reference it must equal (tested).
"""

from __future__ import annotations

import threading

import numpy as np

from fusemerge.merge.kernels import cpu as kernels
from fusemerge.merge.kernels.chunks import CHUNK_ELEMENTS, spans
from fusemerge.merge.kernels.views import kernel_view
from fusemerge.merge.lazy_torch import torch


def fused_combine(
    inputs: list[torch.Tensor],
    b_flat: torch.Tensor,
    out_flat: torch.Tensor,
    masks: tuple[np.ndarray, np.ndarray, list[np.ndarray | None]],
    coefficients: list[float],
    weight: list[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> None:
    """Task arithmetic / TIES over CPU chunks in a few fused loops (see `task_arithmetic.combine`).

    `masks` is (keep_above, last_tied, bits), per model: its magnitude threshold (-1 keeps everything),
    the last flat index at which an element equal to the threshold is still kept, and where not None a
    packed bit per element (DARE's draws) that decides instead.
    """
    keep_above, last_tied, bits = masks
    coef = np.array(coefficients, dtype=np.float32)
    weights = np.array(weight, dtype=np.float32)
    total = sum(weight)
    scale = 1.0 / (total if abs(total) >= 1e-8 else 1.0) if normalize and not consensus else 1.0
    out_np = kernel_view(out_flat)
    plain = not consensus and all(m is None for m in bits) and bool(np.all(keep_above < 0))
    if plain and len({x.dtype for x in inputs}) == 1:  # task arithmetic: one tuple kernel, sum in registers
        for span in spans(out_flat.numel()):
            xs = tuple(kernel_view(x[span]) for x in inputs)
            b = kernel_view(b_flat[span])
            kernels.task_sum_tuple(xs, b, coef, np.float32(scale), np.float32(lambda_), out_np[span])
        return
    delta, vote, mixed, divisor = _scratch()
    for span in spans(out_flat.numel()):
        n = span.stop - span.start
        b = kernel_view(b_flat[span])
        xs = [kernel_view(x[span]) for x in inputs]
        for j, c in enumerate(coef):
            if j == 0 and consensus:
                # TIES reads only the vote's sign, and 0 + d equals d up to a zero's sign: the first
                # model's delta is the vote (no zeroing pass, no add pass)
                _kept_delta(xs[0], b, keep_above[0], last_tied[0], bits[0], span.start, c, vote[:n])
                continue
            if j == 0:
                vote[:n] = 0
            _kept_delta(xs[j], b, keep_above[j], last_tied[j], bits[j], span.start, c, delta[:n])
            kernels.add_into(vote[:n], delta[:n])
        if not consensus:
            kernels.finish_sum(b, vote[:n], np.float32(scale), np.float32(lambda_), out_np[span])
            continue
        mixed[:n] = 0
        divisor[:n] = 0
        for j, (c, w) in enumerate(zip(coef, weights, strict=True)):
            _kept_delta(xs[j], b, keep_above[j], last_tied[j], bits[j], span.start, c, delta[:n])
            kernels.add_agreeing(vote[:n], delta[:n], w, mixed[:n], divisor[:n])
        kernels.finish_agreeing(b, mixed[:n], divisor[:n], normalize, np.float32(lambda_), out_np[span])


_SCRATCH = threading.local()


def _scratch() -> tuple[np.ndarray, ...]:
    """Four float32 chunk buffers, allocated once per thread and reused for every tensor: fresh ones per
    tensor came from the OS each time, and faulting in and zeroing their pages (then filling them) cost
    2.8 s of a 12 s DARE-TIES merge of a 1.1B model, more than its arithmetic."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = tuple(np.empty(CHUNK_ELEMENTS, dtype=np.float32) for _ in range(4))
    return buffers


def _kept_delta(x, b, threshold, last, bits, start: int, c, out: np.ndarray) -> None:
    """One model's weighted, sparsified delta over the chunk starting at flat index `start`."""
    if bits is not None:
        kernels.kept_delta_bits(x, b, bits, start, c, out)
    else:
        kernels.kept_delta(x, b, threshold, last - start, c, out)
