"""Fused numba kernels for the task-vector methods (TIES, task arithmetic with sparsification).

Written with torch ops, TIES makes a dozen passes over memory per element (delta, |delta|, mask, weight,
vote, sign tests, sums, division) and a full argsort for the density selection; on a CPU that is memory
traffic, not arithmetic. Here each element is read once per pass and everything stays in registers:
- the k-th largest |delta| is found by a radix select on the float bits (two histogram passes), O(n);
- the merge itself (sparsify, weight, elect sign, sum agreeing deltas, normalise) is one fused loop.
Inputs are float32 chunks (the engine's float32 working copies), so results equal the torch reference.
"""

from __future__ import annotations

import numpy as np
from numba import njit

HI_BINS = 1 << 16


@njit(cache=True)
def _histogram_hi(x, b, hist):  # pragma: no cover - compiled
    mag = np.abs(x - b).view(np.uint32)
    for i in range(mag.size):
        hist[mag[i] >> 16] += 1


@njit(cache=True)
def _histogram_lo(x, b, top, hist):  # pragma: no cover - compiled
    mag = np.abs(x - b).view(np.uint32)
    for i in range(mag.size):
        bits = mag[i]
        if bits >> 16 == top:
            hist[bits & 0xFFFF] += 1


@njit(cache=True)
def _count_ties_until(x, b, threshold_bits, wanted, start):  # pragma: no cover - compiled
    """Index (offset by `start`) of the `wanted`-th element equal to the threshold, or -(ties seen) - 1."""
    mag = np.abs(x - b).view(np.uint32)
    seen = 0
    for i in range(mag.size):
        if mag[i] == threshold_bits:
            seen += 1
            if seen == wanted:
                return start + i
    return -seen - 1


@njit(cache=True)
def _kept_delta(x, b, threshold, tie_limit, coefficient, out):  # pragma: no cover - compiled
    """out[i] = (x[i] - b[i]) * coefficient where the magnitude selection keeps element i, else 0.

    Branch-free (0/1 multiplies): which elements survive a 50% selection is random, so branches would be
    mispredicted half the time; simple loops like this one vectorise."""
    for i in range(x.size):
        d = x[i] - b[i]
        a = abs(d)
        kept = (a > threshold) | ((a == threshold) & (i <= tie_limit))
        out[i] = d * coefficient * np.float32(kept)


@njit(cache=True)
def fused_task_vectors(
    xs,
    b,
    thresholds,
    last_tied,
    start,
    coefficients,
    weights,
    consensus,
    scale,
    lam,
    out,
    delta,
    vote,
    divisor,
):  # pragma: no cover
    """out = b + merged task vector (see task_arithmetic.combine for the torch reference).

    xs: [k, n] float32 chunk of each model; thresholds/last_tied: each model's magnitude selection
    (threshold -1 keeps everything); coefficients: weight * rescale; weights: raw weights (TIES divisor);
    consensus: TIES sign election; scale: task arithmetic's 1/sum(weights) (or 1), for TIES non-zero
    means 'normalise by the agreeing weights'. delta, vote, divisor: [n] float32 scratch buffers.
    """
    k, n = xs.shape
    zero = np.float32(0.0)
    vote[:n] = zero
    for j in range(k):
        _kept_delta(xs[j], b, thresholds[j], last_tied[j] - start, coefficients[j], delta)
        for i in range(n):
            vote[i] += delta[i]
    if not consensus:
        for i in range(n):
            out[i] = b[i] + (vote[i] * scale) * lam
        return
    out[:n] = zero
    divisor[:n] = zero
    for j in range(k):
        _kept_delta(xs[j], b, thresholds[j], last_tied[j] - start, coefficients[j], delta)
        w = weights[j]
        for i in range(n):
            dj = delta[i]
            agree = np.float32(((vote[i] >= zero) & (dj > zero)) | ((vote[i] < zero) & (dj < zero)))
            out[i] += dj * agree
            divisor[i] += w * agree
    for i in range(n):
        mixed = out[i]
        if scale != zero:  # normalise by the weights of the agreeing models
            mixed = mixed / (divisor[i] + np.float32(divisor[i] == zero))
        out[i] = b[i] + mixed * lam
