"""Numba kernels of SCE (`fusemerge.merge.methods.sce`): variance selection, model weights, sign erase.

Written with torch ops, SCE stacks every chunk's deltas into a models x chunk float32 copy several times
and calls torch.var, whose CPU reduction over a short dimension runs one scalar Welford loop per element
(most of SCE's time). Here each element's deltas live in registers: the variance is recomputed in every
pass (cheaper than holding 4 bytes per element of a 65M-element embedding), and the result is written in
the output dtype directly. `xs` is a tuple of the models' chunks, all of one dtype (bf16 bits or float32).
The arithmetic follows the torch path exactly (tested): float32 deltas, the variance by torch's Welford
update in float64 rounded once to float32, the weights' sums in float64, the erase sums in float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fusemerge.merge.kernels.cpu import _f32_to_bits, as_f32, store


@njit(cache=True)
def _variance(xs, b, i):  # pragma: no cover - compiled
    """Population variance across models of element i's deltas, as torch.var(unbiased=False) on CPU
    computes it: Welford's update in float64 over the float32 deltas, rounded to float32 at the end."""
    base = as_f32(b[i])
    mean = 0.0
    m2 = 0.0
    for j in range(len(xs)):
        d = np.float64(as_f32(xs[j][i]) - base)
        delta = d - mean
        mean = mean + delta / np.float64(j + 1)
        m2 = m2 + delta * (d - mean)
    return abs(np.float32(m2 / np.float64(len(xs))))


@njit(cache=True)
def _kept(xs, b, i, select, threshold, tie_limit):  # pragma: no cover - compiled
    """1.0 where the variance selection keeps element i (always without `select`), else 0.0."""
    if not select:
        return np.float32(1.0)
    v = _variance(xs, b, i)
    return np.float32((v > threshold) | ((v == threshold) & (i <= tie_limit)))


@njit(cache=True)
def variance_histogram_hi(xs, b, hist):  # pragma: no cover - compiled
    """hist[top 16 bits of the variance] += 1; returns how many variances are non-zero."""
    nonzero = 0
    for i in range(b.size):
        v = _variance(xs, b, i)
        hist[_f32_to_bits(v) >> 16] += 1
        nonzero += v != np.float32(0.0)
    return nonzero


@njit(cache=True)
def variance_histogram_lo(xs, b, top, hist):  # pragma: no cover - compiled
    for i in range(b.size):
        bits = _f32_to_bits(_variance(xs, b, i))
        if bits >> 16 == top:
            hist[bits & 0xFFFF] += 1


@njit(cache=True)
def variance_tie_index(xs, b, threshold_bits, wanted, start):  # pragma: no cover - compiled
    """Index (offset by `start`) of the `wanted`-th variance equal to the threshold, or -(ties seen) - 1."""
    seen = 0
    for i in range(b.size):
        if _f32_to_bits(_variance(xs, b, i)) == threshold_bits:
            seen += 1
            if seen == wanted:
                return start + i
    return -seen - 1


@njit(cache=True)
def selected_squares(xs, b, select, threshold, tie_limit, squares):  # pragma: no cover - compiled
    """squares[j] += sum over the chunk of (selected delta_j)^2, each square in float32, summed in float64."""
    for i in range(b.size):
        kept = _kept(xs, b, i, select, threshold, tie_limit)
        base = as_f32(b[i])
        for j in range(len(xs)):
            d = (as_f32(xs[j][i]) - base) * kept
            squares[j] += np.float64(d * d)


@njit(cache=True)
def erase_merge(xs, b, select, threshold, tie_limit, weights, out):  # pragma: no cover - compiled
    """out = base + sum_j w_j d_j [sign d_j = elected] / max(sum_j w_j [sign d_j = elected], 1e-6), the
    elected sign being + where the selected deltas sum to >= 0. The deltas are recomputed in the second
    loop rather than kept in a scratch array: stores and loads through one were 10x slower."""
    zero = np.float32(0.0)
    floor = np.float32(1e-6)
    for i in range(b.size):
        kept = _kept(xs, b, i, select, threshold, tie_limit)
        base = as_f32(b[i])
        total = zero
        for j in range(len(xs)):
            total += (as_f32(xs[j][i]) - base) * kept
        positive = total >= zero  # the elected sign; sign(d) equals it (d not NaN) iff d > 0, or d < 0
        num = zero
        den = zero
        for j in range(len(xs)):
            d = (as_f32(xs[j][i]) - base) * kept
            agree = (d > zero) if positive else (d < zero)
            erased = weights[j] * np.float32(agree)
            num += d * erased
            den += erased
        if den < floor:  # torch's clamp(min=1e-6)
            den = floor
        store(out, i, base + num / den)
