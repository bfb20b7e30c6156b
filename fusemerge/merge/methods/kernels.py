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
from numba import njit, prange

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


@njit(parallel=True, cache=True)
def fused_task_vectors(
    xs, b, thresholds, last_tied, start, coefficients, weights, consensus, scale, lam, out
):  # pragma: no cover
    """out[i] = b[i] + merged task vector at i (see task_arithmetic._combine for the torch reference).

    xs: [k, n] float32 chunk of each model; thresholds/last_tied: the magnitude selection per model
    (threshold -1 keeps everything); coefficients: weight * rescale per model; weights: raw weights (TIES
    divisor); consensus: TIES sign election; scale: 1/sum(weights) or 1 for task arithmetic (lam apart).
    """
    k, n = xs.shape
    for i in prange(n):
        bi = b[i]
        vote = np.float32(0.0)
        for j in range(k):
            d = xs[j, i] - bi
            a = abs(d)
            if a > thresholds[j] or (a == thresholds[j] and start + i <= last_tied[j]):
                vote += d * coefficients[j]
        if not consensus:
            out[i] = bi + (vote * scale) * lam
            continue
        mixed = np.float32(0.0)
        divisor = np.float32(0.0)
        for j in range(k):
            d = xs[j, i] - bi
            a = abs(d)
            if a > thresholds[j] or (a == thresholds[j] and start + i <= last_tied[j]):
                dj = d * coefficients[j]
                if (vote >= 0 and dj > 0) or (vote < 0 and dj < 0):
                    mixed += dj
                    divisor += weights[j]
        if scale != 0:  # normalise by the weights of the agreeing models
            if divisor == 0:
                divisor = np.float32(1.0)
            mixed = mixed / divisor
        out[i] = bi + mixed * lam
