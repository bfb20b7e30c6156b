"""Numba kernels for the CPU hot loops of the merge methods and sparsification (the NaN/Inf scan of the
engine's inputs is `fusemerge.checkpoint.finite`, shared with fuse).

Written with torch ops, TIES makes a dozen passes over memory per element (delta, |delta|, mask, weight,
vote, sign tests, sums, division) plus a full sort for the density selection, and every bf16 input is first
converted to a float32 copy. On a CPU that is memory traffic, not arithmetic. These kernels:
- read bf16 inputs in place (a bf16 is the top half of a float32: widening is a shift and a bitcast), so a
  2-byte element is read once per pass instead of being copied to 4 bytes first;
- find the k-th largest |delta| by a radix select on the float bits (two 16-bit histogram passes), O(n);
- fuse sparsify, weight, sign election, sum and normalisation into a few branch-free loops (a random 50%
  selection would mispredict branches half the time; 0/1 multiplies keep the loops vectorisable).
They are serial on purpose: on our 2-core machines numba's thread pool was 4x slower than one thread while
the engine's reader and writer threads run beside it.
All arithmetic is float32, in the same order as the torch reference, so results match it (tested).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

HI_BINS = 1 << 16


@intrinsic
def _bits_to_f32(typingctx, bits):  # pragma: no cover - compiled
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        word = context.cast(builder, args[0], signature.args[0], types.uint32)
        return builder.bitcast(word, context.get_value_type(types.float32))

    return types.float32(bits), codegen


@intrinsic
def _f32_to_bits(typingctx, value):  # pragma: no cover - compiled
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


def as_f32(value):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


@overload(as_f32)
def _as_f32(value):  # pragma: no cover - compiled
    if value == types.uint16:  # a bf16 element, viewed as its bits
        return lambda value: _bits_to_f32(np.uint32(value) << np.uint32(16))
    if value == types.float32:
        return lambda value: value
    return None


def store(out, i, value):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


@overload(store)
def _store(out, i, value):  # pragma: no cover - compiled
    """out[i] = value, rounding to bf16 (round to nearest even, as torch does) when `out` holds bf16 bits:
    results are written straight in the output dtype, with no float32 copy of the whole tensor."""
    if out.dtype == types.uint16:

        def to_bf16(out, i, value):
            bits = _f32_to_bits(value)
            if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN stays a (quiet) NaN
                out[i] = np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
            else:
                rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
                out[i] = np.uint16((bits + rounding) >> np.uint32(16))

        return to_bf16
    if out.dtype == types.float32:

        def as_is(out, i, value):
            out[i] = value

        return as_is
    return None


@njit(cache=True)
def histogram_hi(x, b, hist):  # pragma: no cover - compiled
    """hist[top 16 bits of |x - b|] += 1 (non-negative floats order like their bit patterns)."""
    for i in range(x.size):
        hist[_f32_to_bits(abs(as_f32(x[i]) - as_f32(b[i]))) >> 16] += 1


@njit(cache=True)
def histogram_lo(x, b, top, hist):  # pragma: no cover - compiled
    for i in range(x.size):
        bits = _f32_to_bits(abs(as_f32(x[i]) - as_f32(b[i])))
        if bits >> 16 == top:
            hist[bits & 0xFFFF] += 1


@njit(cache=True)
def tie_index(x, b, threshold_bits, wanted, start):  # pragma: no cover - compiled
    """Index (offset by `start`) of the `wanted`-th element equal to the threshold, or -(ties seen) - 1."""
    seen = 0
    for i in range(x.size):
        if _f32_to_bits(abs(as_f32(x[i]) - as_f32(b[i]))) == threshold_bits:
            seen += 1
            if seen == wanted:
                return start + i
    return -seen - 1


@njit(cache=True)
def kept_delta(x, b, threshold, tie_limit, coefficient, out):  # pragma: no cover - compiled
    """out[i] = (x[i] - b[i]) * coefficient where the magnitude selection keeps element i, else 0.
    threshold -1 keeps everything; ties at the threshold are kept up to index `tie_limit`."""
    for i in range(x.size):
        d = as_f32(x[i]) - as_f32(b[i])
        a = abs(d)
        kept = (a > threshold) | ((a == threshold) & (i <= tie_limit))
        out[i] = d * coefficient * np.float32(kept)


@njit(cache=True)
def kept_norms(x, b, threshold, tie_limit):  # pragma: no cover - compiled
    """(sum |delta|, sum of the kept |delta|) in float64 under a magnitude selection: the L1 `rescale`."""
    before = 0.0
    after = 0.0
    for i in range(x.size):
        a = abs(as_f32(x[i]) - as_f32(b[i]))
        kept = (a > threshold) | ((a == threshold) & (i <= tie_limit))
        before += a
        after += a * np.float32(kept)
    return before, after


@njit(cache=True)
def kept_delta_bits(x, b, bits, offset, coefficient, out):  # pragma: no cover - compiled
    """out[i] = (x[i] - b[i]) * coefficient where bit offset+i of the packed mask `bits` is set, else 0.

    Where the chunk starts on a byte (always: chunks are multiples of 8 elements), one mask byte is
    loaded per 8 elements in an unrolled inner loop, which LLVM vectorises (4x faster than a byte load
    and shift per element); any remainder goes element by element."""
    start = 0
    if offset & 7 == 0:
        first_byte = offset >> 3
        for q in range(x.size >> 3):
            byte = bits[first_byte + q]
            for r in range(8):
                i = q * 8 + r
                d = as_f32(x[i]) - as_f32(b[i])
                out[i] = d * coefficient * np.float32((byte >> np.uint8(r)) & np.uint8(1))
        start = (x.size >> 3) * 8
    for i in range(start, x.size):
        d = as_f32(x[i]) - as_f32(b[i])
        j = offset + i
        kept = (bits[j >> 3] >> np.uint8(j & 7)) & np.uint8(1)
        out[i] = d * coefficient * np.float32(kept)


@njit(cache=True)
def add_into(acc, delta):  # pragma: no cover - compiled
    for i in range(acc.size):
        acc[i] += delta[i]


@njit(cache=True)
def add_agreeing(vote, delta, weight, mixed, divisor):  # pragma: no cover - compiled
    """TIES: add the deltas whose sign matches the elected one (+ where the vote is >= 0)."""
    zero = np.float32(0.0)
    for i in range(vote.size):
        d = delta[i]
        agree = np.float32(((vote[i] >= zero) & (d > zero)) | ((vote[i] < zero) & (d < zero)))
        mixed[i] += d * agree
        divisor[i] += weight * agree


@njit(cache=True)
def finish_sum(b, vote, scale, lam, out):  # pragma: no cover - compiled
    for i in range(out.size):
        store(out, i, as_f32(b[i]) + (vote[i] * scale) * lam)


@njit(cache=True)
def finish_agreeing(b, mixed, divisor, normalize, lam, out):  # pragma: no cover - compiled
    zero = np.float32(0.0)
    for i in range(out.size):
        m = mixed[i]
        if normalize:
            m = m / (divisor[i] + np.float32(divisor[i] == zero))
        store(out, i, as_f32(b[i]) + m * lam)


@njit(cache=True)
def weighted_into(x, coefficient, out, first):  # pragma: no cover - compiled
    """out = x * c (first model) or out += x * c: linear and VaRM's weighted sums."""
    if first:
        for i in range(out.size):
            out[i] = as_f32(x[i]) * coefficient
    else:
        for i in range(out.size):
            out[i] += as_f32(x[i]) * coefficient


@njit(cache=True)
def store_scaled(acc, divide_by, out):  # pragma: no cover - compiled
    """out = acc / divide_by, in out's dtype (float32, or bf16 bits)."""
    for i in range(acc.size):
        value = acc[i]
        if divide_by != np.float32(1.0):
            value = value / divide_by
        store(out, i, value)


@njit(cache=True)
def weighted_tuple(xs, coefficients, divide_by, out):  # pragma: no cover - compiled
    """out = sum_j xs[j] * c_j / divide_by with the sum in registers: `weighted_into` + `store_scaled`'s
    arithmetic in their order, reading each input once and writing only the result (`xs`: one dtype)."""
    for i in range(out.size):
        acc = as_f32(xs[0][i]) * coefficients[0]
        for j in range(1, len(xs)):
            acc += as_f32(xs[j][i]) * coefficients[j]
        if divide_by != np.float32(1.0):
            acc = acc / divide_by
        store(out, i, acc)


@njit(cache=True)
def task_sum_tuple(xs, b, coefficients, scale, lam, out):  # pragma: no cover - compiled
    """Task arithmetic without masks: out = b + (sum_j (xs[j] - b) * c_j * scale) * lam, the arithmetic
    of kept_delta + add_into + finish_sum in their order, with the sum in registers (one read of each
    input, one write). Only this branch-free form is fused across models: with per-model masks in the
    loop (TIES, DARE) LLVM no longer vectorises it and the per-model kernels were 3x faster."""
    for i in range(out.size):
        base = as_f32(b[i])
        vote = np.float32(0.0)
        for j in range(len(xs)):
            vote += (as_f32(xs[j][i]) - base) * coefficients[j]
        store(out, i, base + (vote * scale) * lam)


@njit(cache=True)
def _mt_seeded(seed):  # pragma: no cover - compiled
    """MT19937 state as torch's CPU generator seeds it (`manual_seed`: the seed's low 32 bits)."""
    state = np.empty(624, dtype=np.uint32)
    state[0] = np.uint32(seed & 0xFFFFFFFF)
    for j in range(1, 624):
        prev = np.uint64(state[j - 1])
        state[j] = np.uint32(
            (np.uint64(1812433253) * (prev ^ (prev >> np.uint64(30))) + np.uint64(j)) & 0xFFFFFFFF
        )
    return state


@njit(cache=True)
def _mt_twist(state):  # pragma: no cover - compiled
    """The next 624 words of MT19937's state, in three runs so that no index needs a modulo."""
    upper, lower, matrix = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF)
    for k in range(227):
        y = (state[k] & upper) | (state[k + 1] & lower)
        state[k] = state[k + 397] ^ (y >> np.uint32(1)) ^ ((np.uint32(0) - (y & np.uint32(1))) & matrix)
    for k in range(227, 623):
        y = (state[k] & upper) | (state[k + 1] & lower)
        state[k] = state[k - 227] ^ (y >> np.uint32(1)) ^ ((np.uint32(0) - (y & np.uint32(1))) & matrix)
    y = (state[623] & upper) | (state[0] & lower)
    state[623] = state[396] ^ (y >> np.uint32(1)) ^ ((np.uint32(0) - (y & np.uint32(1))) & matrix)


@njit(cache=True, fastmath={"reassoc"})
def _l1_sums(x, b, kept):  # pragma: no cover - compiled
    """(sum |x - b|, sum of those where kept) in float64. `reassoc` lets LLVM vectorise the two sums (it
    may regroup the float64 additions); each |x - b| is one float32 subtraction, rounded as before."""
    before = 0.0
    after = 0.0
    for k in range(kept.size):
        a = np.float64(abs(as_f32(x[k]) - as_f32(b[k])))
        before += a
        after += a * np.float64(kept[k])
    return before, after


@njit(cache=True)
def _pack_bytes(kept, bits):  # pragma: no cover - compiled
    """OR 0/1 flags `kept` (8 * len(bits) of them) into whole bytes of `bits`, little-endian bit order."""
    for q in range(bits.size):
        k = q << 3
        bits[q] |= (
            kept[k]
            | (kept[k + 1] << np.uint8(1))
            | (kept[k + 2] << np.uint8(2))
            | (kept[k + 3] << np.uint8(3))
            | (kept[k + 4] << np.uint8(4))
            | (kept[k + 5] << np.uint8(5))
            | (kept[k + 6] << np.uint8(6))
            | (kept[k + 7] << np.uint8(7))
        )


@njit(cache=True)
def draw_kept_seeded(x, b, seed, density, bits, offset):  # pragma: no cover - compiled
    """DARE: element offset+i is kept where its draw is < density (float32, as torch compares a float32
    tensor with a Python scalar); its flag goes to bit (offset+i) & 7 of bits[(offset+i) >> 3], which
    must start zeroed. Returns (sum |delta|, sum of the kept |delta|) in float64 for the L1 `rescale`.
    The draws are torch.rand(n, generator=manual_seed(seed))'s on the CPU, made here: MT19937 whose
    32-bit outputs become (u & 0xFFFFFF) * 2^-24 (tested equal to torch's stream).

    One MT block (624 words) at a time, in separate loops LLVM vectorises: temper the words into keep
    flags, the two L1 sums, the flags packed a byte per 8 elements (4.5x the single loop that did all of
    it per element: 0.44 against 2.0 ns per element). `u * 2^-24 < density` is `u < ceil(density * 2^24)`
    exactly (u has 24 bits, density is a float32: both sides are exact in float64)."""
    state = _mt_seeded(seed)
    limit = np.uint32(0)
    if density > np.float32(0.0):
        limit = np.uint32(min(np.ceil(np.float64(density) * 16777216.0), 16777216.0))
    kept = np.empty(624, dtype=np.uint8)
    n = x.size
    before = 0.0
    after = 0.0
    for start in range(0, n, 624):
        _mt_twist(state)
        m = min(624, n - start)
        for k in range(m):
            y = state[k]
            y ^= y >> np.uint32(11)
            y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            kept[k] = np.uint8((y & np.uint32(0xFFFFFF)) < limit)
        one = _l1_sums(x[start : start + m], b[start : start + m], kept[:m])
        before += one[0]
        after += one[1]
        whole = 0
        if offset & 7 == 0:  # always in a merge: chunks start at multiples of 8 elements, blocks are 624
            whole = m & ~7
            first = (offset + start) >> 3
            _pack_bytes(kept[:whole], bits[first : first + (whole >> 3)])
        for k in range(whole, m):
            j = offset + start + k
            bits[j >> 3] |= kept[k] << np.uint8(j & 7)
    return before, after
