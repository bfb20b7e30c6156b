"""The compiled part of MinED ("dtw") alignment: edit distances, table fill and walk back, in numba.

`fusemerge.fuse.align.dtw` turns a batch of token strings into integer arrays (`_intern`) and makes one
`align_pairs` call for the whole batch; everything here works on those arrays and never calls back into
Python. Every float is formed as in the FuseChat reference (`ed * 0.1` in float64, then
`cost + min(...)`), so the result is the reference's alignment, ties included:

- `_levenshtein` / `_myers`: unit-cost edit distance of two code-point slices, bit-parallel for up to 64
  code points (what rapidfuzz's `Levenshtein.distance` computes on the strings);
- `_pair_costs`: each distinct (source, pivot) string pair's MinED cost, memoised across the batch;
  containment is tested only where it is possible (a substring's edit distance to its superstring is
  exactly their length difference);
- `_fill_full` / `_fill_band`: the (n x m) table, whole or within a band around the diagonal;
- `_walk_back`: the reference's walk back from (n-1, m-1), written as CSR by pivot position.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np

INF = np.inf
_SCRATCH = threading.local()


@numba.njit(cache=True, nogil=True)
def _contains(hay: np.ndarray, h0: int, hl: int, needle: np.ndarray, n0: int, nl: int) -> bool:
    if nl == 0:
        return True
    for start in range(hl - nl + 1):
        k = 0
        while k < nl and hay[h0 + start + k] == needle[n0 + k]:
            k += 1
        if k == nl:
            return True
    return False


@numba.njit(cache=True, nogil=True)
def _levenshtein(a: np.ndarray, a0: int, la: int, b: np.ndarray, b0: int, lb: int, row: np.ndarray) -> int:
    """Unit-cost Levenshtein distance of two code-point slices (what rapidfuzz's `Levenshtein.distance`
    computes on the strings), so that a batch needs no call back into Python per string pair.

    A common prefix and suffix never change the distance and are cut first (most token pairs differ
    early); a remainder of up to 64 code points on one side runs bit-parallel (Myers/Hyyrö, one machine
    word per column), longer ones run the plain one-row DP in `row` (scratch, at least `lb + 1` long).
    """
    while la > 0 and lb > 0 and a[a0] == b[b0]:
        a0 += 1
        b0 += 1
        la -= 1
        lb -= 1
    while la > 0 and lb > 0 and a[a0 + la - 1] == b[b0 + lb - 1]:
        la -= 1
        lb -= 1
    if la == 0:
        return lb
    if lb == 0:
        return la
    if la > lb:  # the pattern (bit vector) side is the shorter one
        a, a0, la, b, b0, lb = b, b0, lb, a, a0, la
    if la <= 64:
        one = np.uint64(1)
        pv = ~np.uint64(0)
        mv = np.uint64(0)
        last = one << np.uint64(la - 1)
        score = la
        for j in range(lb):
            c = b[b0 + j]
            eq = np.uint64(0)
            bit = one
            for k in range(la):
                if a[a0 + k] == c:
                    eq |= bit
                bit <<= one
            xv = eq | mv
            xh = (((eq & pv) + pv) ^ pv) | eq
            ph = mv | ~(xh | pv)
            mh = pv & xh
            if ph & last:
                score += 1
            elif mh & last:
                score -= 1
            ph = (ph << one) | one
            mh <<= one
            pv = mh | ~(xv | ph)
            mv = ph & xv
        return score
    for j in range(lb + 1):
        row[j] = j
    for i in range(la):
        diag = row[0]
        row[0] = i + 1
        ca = a[a0 + i]
        for j in range(lb):
            up = row[j + 1]
            best = diag if ca == b[b0 + j] else diag + 1
            if up + 1 < best:
                best = up + 1
            if row[j] + 1 < best:
                best = row[j] + 1
            row[j + 1] = best
            diag = up
    return row[lb]


@numba.njit(cache=True, nogil=True)
def _myers(peq: np.ndarray, la: int, b: np.ndarray, b0: int, lb: int) -> int:
    """Levenshtein distance of a pattern of 1..64 code points, given as `peq` (code point -> bit mask of
    the pattern's positions holding it), to the text `b[b0:b0 + lb]`: Myers/Hyyrö, one word per column.

    Building `peq` once per source string and reusing it against every pivot string is what makes this
    cheaper than the general `_levenshtein` on the short strings tokens are.
    """
    one = np.uint64(1)
    pv = ~np.uint64(0)
    mv = np.uint64(0)
    top = np.uint64(la - 1)
    score = la
    for j in range(lb):
        eq = peq[b[b0 + j]]
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        # +1 / -1 where the last row's horizontal delta is; branch-free (the sign is data-dependent)
        score += np.int64((ph >> top) & one) - np.int64((mh >> top) & one)
        ph = (ph << one) | one
        mh <<= one
        pv = mh | ~(xv | ph)
        mv = ph & xv
    return score


@numba.njit(cache=True, nogil=True)
def _cell(table: np.ndarray, lo: np.ndarray, hi: np.ndarray, i: int, j: int) -> float:
    """D[i+1][j+1] of the reference (its `matrix[i, j]` after slicing); inf outside the band."""
    if i < 0 or j < 0 or j < lo[i] or j >= hi[i]:
        return INF
    return table[i, j - lo[i]]


@numba.njit(cache=True, nogil=True)
def _fill_full(cost: np.ndarray, su: np.ndarray, pu: np.ndarray, table: np.ndarray) -> None:
    """The reference's table D[1:, 1:] into `table` (n x m), every cell (the common case: no band)."""
    n, m = su.shape[0], pu.shape[0]
    row = cost[su[0]]
    acc = 0.0
    for j in range(m):  # first row: only 'left' (and D[0][0] = 0 before the first cell)
        acc = row[pu[j]] + acc
        table[0, j] = acc
    for i in range(1, n):
        row = cost[su[i]]
        prev = table[i - 1]
        cur = table[i]
        left = INF
        for j in range(m):
            best = prev[j]  # up
            if j > 0:
                if prev[j - 1] < best:
                    best = prev[j - 1]  # diagonal
                if left < best:
                    best = left
            left = row[pu[j]] + best
            cur[j] = left


@numba.njit(cache=True, nogil=True)
def _fill_band(
    cost: np.ndarray, su: np.ndarray, pu: np.ndarray, lo: np.ndarray, hi: np.ndarray, table: np.ndarray
) -> None:
    """The same table, only within [lo[i], hi[i]) of each row (stored from column lo[i]) of `table`."""
    n = su.shape[0]
    for i in range(n):
        ci = su[i]
        for j in range(lo[i], hi[i]):
            if i == 0 and j == 0:
                best = 0.0  # D[0][0]
            else:
                best = _cell(table, lo, hi, i - 1, j - 1) if i > 0 else INF
                up = _cell(table, lo, hi, i - 1, j) if i > 0 else INF
                left = _cell(table, lo, hi, i, j - 1)
                if up < best:
                    best = up
                if left < best:
                    best = left
            table[i, j - lo[i]] = cost[ci, pu[j]] + best


@numba.njit(cache=True, nogil=True)
def _walk_back(
    table: np.ndarray, lo: np.ndarray, hi: np.ndarray, m: int, indptr: np.ndarray, indices: np.ndarray
) -> int:
    """Walk back from (n-1, m-1) as the reference does; write the alignment by pivot as CSR into
    `indptr` (m + 1 zeros) and `indices` (room for n + m - 1), and return how many indices it wrote."""
    n = lo.shape[0]
    i, j, steps = n - 1, m - 1, 0
    room = indices.shape[0]
    while i > 0 or j > 0:  # recorded backwards from the end of `indices`, moved to the front below
        indices[room - 1 - steps] = i
        indptr[j + 1] += 1
        steps += 1
        diag = _cell(table, lo, hi, i - 1, j - 1) if i > 0 and j > 0 else INF
        up = _cell(table, lo, hi, i - 1, j) if i > 0 else INF
        left = _cell(table, lo, hi, i, j - 1) if j > 0 else INF
        if diag <= up and diag <= left:  # np.argmin: the first of equal minima wins
            i -= 1
            j -= 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    indices[room - 1 - steps] = 0
    indptr[1] += 1
    steps += 1
    for c in range(m):
        indptr[c + 1] += indptr[c]
    for k in range(steps):  # reversed, the path is ascending in i and j
        indices[k] = indices[room - steps + k]
    return steps


@numba.njit(cache=True, nogil=True)
def _band_rows(n: int, m: int, band: int, lo: np.ndarray, hi: np.ndarray) -> None:
    """`_band_limits` for one pair, into `lo[:n]`, `hi[:n]` (same floats, same rounding)."""
    slope = (m - 1) / (n - 1) if n > 1 else 0.0
    half = max(band, math.ceil(slope) + 1)
    for i in range(n):
        centre = i * slope
        lo[i] = min(max(math.floor(centre - half), 0), m - 1)
        hi[i] = min(max(math.ceil(centre + half) + 1, 1), m)
    hi[n - 1] = m


@numba.njit(cache=True, nogil=True)
def _pair_costs(
    ns: int,
    np_: int,
    s_glob: np.ndarray,
    p_glob: np.ndarray,
    s_cp: np.ndarray,
    s_off: np.ndarray,
    p_cp: np.ndarray,
    p_off: np.ndarray,
    memo: np.ndarray,
    peq: np.ndarray,
    row: np.ndarray,
    cost: np.ndarray,
) -> None:
    """MinED cost of each of one pair's distinct (source, pivot) strings into `cost` (ns x np_).

    `memo[g, h]` keeps `2 * ed + contained` of global strings g, h once known (-1 before), so a string
    pair met again in another conversation of the batch costs one load.
    """
    for a in range(ns):
        ga = s_glob[a]
        a0, la = s_off[ga], s_off[ga + 1] - s_off[ga]
        bits = 0 < la <= 64
        if bits:
            for q in range(la):
                peq[s_cp[a0 + q]] |= np.uint64(1) << np.uint64(q)
        for b in range(np_):
            gb = p_glob[b]
            v = memo[ga, gb]
            if v < 0:
                b0, lb = p_off[gb], p_off[gb + 1] - p_off[gb]
                if la == 0:
                    d = lb
                elif bits:
                    d = _myers(peq, la, p_cp, b0, lb)
                else:
                    d = _levenshtein(s_cp, a0, la, p_cp, b0, lb, row)
                inside = False
                if d == abs(la - lb):  # necessary for containment; exact test only then
                    if la <= lb:
                        inside = _contains(p_cp, b0, lb, s_cp, a0, la)
                    else:
                        inside = _contains(s_cp, a0, la, p_cp, b0, lb)
                v = 2 * d + (1 if inside else 0)
                memo[ga, gb] = v
            d = v >> 1
            cost[a, b] = d * 0.1 if v & 1 else float(d)  # the reference's float64 `ed * 0.1`
        if bits:  # leave `peq` all zeros again, as the next string (and the next call) expects
            for q in range(la):
                peq[s_cp[a0 + q]] = 0


@numba.njit(cache=True, nogil=True)
def _localize(
    ids: np.ndarray, start: int, length: int, local: np.ndarray, glob: np.ndarray, out: np.ndarray
) -> int:
    """Number one sequence's distinct global ids 0, 1, ... in order of appearance: `out[:length]` gets
    each position's local id, `glob` each local id's global id; `local` (all -1) is left all -1."""
    count = 0
    for i in range(length):
        g = ids[start + i]
        if local[g] < 0:
            local[g] = count
            glob[count] = g
            count += 1
        out[i] = local[g]
    for k in range(count):
        local[glob[k]] = -1
    return count


@numba.njit(cache=True, nogil=True)
def align_pairs(s_ids, s_seq, s_cp, s_off, p_ids, p_seq, p_cp, p_off, memo, peq, band: int):
    """Every pair of a batch in one compiled call: costs, table fill and walk back.

    `s_ids[s_seq[k]:s_seq[k + 1]]` are pair k's source tokens as ids into the batch's distinct
    marker-free strings (code points `s_cp[s_off[g]:s_off[g + 1]]`), likewise the pivot side; `memo`
    and `peq` as `_pair_costs` wants them; `band` < 0 for none. Returns the CSR alignments of all pairs
    back to back: `indptr` (pair k's m_k + 1 entries start at `p_seq[k] + k`) and `indices` (pair k's
    from `starts[k]` to `starts[k + 1]`). Scratch (tables, costs) is grown, never allocated per pair.
    """
    n_pairs = s_seq.shape[0] - 1
    s_local = np.full(s_off.shape[0] - 1, -1, dtype=np.int64)
    p_local = np.full(p_off.shape[0] - 1, -1, dtype=np.int64)
    longest, widest, chars = 1, 1, 0
    for k in range(n_pairs):
        longest = max(longest, s_seq[k + 1] - s_seq[k])
        widest = max(widest, p_seq[k + 1] - p_seq[k])
    for g in range(s_off.shape[0] - 1):
        chars = max(chars, s_off[g + 1] - s_off[g])
    for g in range(p_off.shape[0] - 1):
        chars = max(chars, p_off[g + 1] - p_off[g])
    row = np.empty(chars + 1, dtype=np.int64)
    s_glob = np.empty(longest, dtype=np.int64)
    p_glob = np.empty(widest, dtype=np.int64)
    su = np.empty(longest, dtype=np.int64)
    pu = np.empty(widest, dtype=np.int64)
    lo = np.zeros(longest, dtype=np.int64)
    hi = np.empty(longest, dtype=np.int64)
    table_buf = np.empty(0, dtype=np.float64)
    cost_buf = np.empty(0, dtype=np.float64)
    indptr = np.zeros(p_seq[n_pairs] + n_pairs, dtype=np.int64)
    indices = np.empty(s_seq[n_pairs] + p_seq[n_pairs], dtype=np.int64)
    starts = np.zeros(n_pairs + 1, dtype=np.int64)
    out = 0
    for k in range(n_pairs):
        s0, n = s_seq[k], s_seq[k + 1] - s_seq[k]
        p0, m = p_seq[k], p_seq[k + 1] - p_seq[k]
        starts[k] = out
        if n == 0 or m == 0:
            continue
        ns = _localize(s_ids, s0, n, s_local, s_glob, su)
        np_ = _localize(p_ids, p0, m, p_local, p_glob, pu)
        if ns * np_ > cost_buf.shape[0]:
            cost_buf = np.empty(ns * np_, dtype=np.float64)
        cost = cost_buf[: ns * np_].reshape((ns, np_))
        _pair_costs(ns, np_, s_glob, p_glob, s_cp, s_off, p_cp, p_off, memo, peq, row, cost)
        full = band < 0 or band >= m
        if full:
            width = m
            lo[:n] = 0
            hi[:n] = m
        else:
            _band_rows(n, m, band, lo, hi)
            width = 0
            for i in range(n):
                width = max(width, hi[i] - lo[i])
        if n * width > table_buf.shape[0]:
            table_buf = np.empty(n * width, dtype=np.float64)
        table = table_buf[: n * width].reshape((n, width))
        if full:
            _fill_full(cost, su[:n], pu[:m], table)
        else:
            _fill_band(cost, su[:n], pu[:m], lo[:n], hi[:n], table)
        out += _walk_back(
            table, lo[:n], hi[:n], m, indptr[p0 + k : p0 + k + m + 1], indices[out : out + n + m]
        )
    starts[n_pairs] = out
    return indptr, indices, starts


def peq_scratch() -> np.ndarray:
    """This thread's all-zero code point -> bit mask table for `_myers` (the kernel zeroes what it sets).

    It spans every code point so that no alphabet has to be built per call; allocated once per thread
    (the kernels release the GIL) and only the pages of code points actually met are ever touched.
    """
    table = getattr(_SCRATCH, "peq", None)
    if table is None:
        table = _SCRATCH.peq = np.zeros(0x110000, dtype=np.uint64)
    return table
