"""MinED token alignment ("dtw"), bit-for-bit the FuseChat reference, compiled.

The reference (`FuseChat/train/align_token_and_vocab.py`, `dtw` + `transform_step_token`) fills an
(n+1) x (m+1) table in a Python double loop, calling an edit distance per cell:

    cost(s, p) = ed(s', p') * (0.1 if s' in p' or p' in s' else 1)   with s' = s.replace(source_marker, "")
    D[i+1][j+1] = cost(s_i, p_j) + min(D[i][j+1], D[i+1][j], D[i][j]),  D[0][0] = 0, other borders inf

then walks back from (n-1, m-1) over D[1:, 1:], taking `np.argmin([diag, up, left])` (ties: diagonal,
then up, then left) and collects, for each pivot position, the source positions on the path.

Here the edit distances come from rapidfuzz's `cdist` over the *distinct* token strings (a chat turn
repeats most of its tokens), containment is only tested where it is possible at all (a substring's edit
distance to its superstring is exactly their length difference), and the table and the walk back run in
numba. Every float is formed as in the reference (`ed * 0.1` in float64, then `cost + min(...)`), so
the result is the same alignment, ties included. An optional band keeps long texts linear in memory.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from fusemerge.fuse.align.alignment import Alignment, TokenizedText
from fusemerge.fuse.align.registry import ALIGNMENT_METHODS

INF = np.inf
_NO_BAND = np.zeros(0, dtype=np.int64)


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
def _costs(ed: np.ndarray, s_cp: np.ndarray, s_off: np.ndarray, p_cp: np.ndarray, p_off: np.ndarray):
    """MinED cost of every distinct (source, pivot) string pair, from their Levenshtein distances."""
    ns, np_ = ed.shape
    out = np.empty((ns, np_), dtype=np.float64)
    for a in range(ns):
        a0, la = s_off[a], s_off[a + 1] - s_off[a]
        for b in range(np_):
            d = ed[a, b]
            b0, lb = p_off[b], p_off[b + 1] - p_off[b]
            inside = False
            if d == abs(la - lb):  # necessary for containment; exact test only then
                if la <= lb:
                    inside = _contains(p_cp, b0, lb, s_cp, a0, la)
                else:
                    inside = _contains(s_cp, a0, la, p_cp, b0, lb)
            out[a, b] = d * 0.1 if inside else float(d)
    return out


@numba.njit(cache=True, nogil=True)
def _cell(table: np.ndarray, lo: np.ndarray, hi: np.ndarray, i: int, j: int) -> float:
    """D[i+1][j+1] of the reference (its `matrix[i, j]` after slicing); inf outside the band."""
    if i < 0 or j < 0 or j < lo[i] or j >= hi[i]:
        return INF
    return table[i, j - lo[i]]


@numba.njit(cache=True, nogil=True)
def _fill_full(cost: np.ndarray, su: np.ndarray, pu: np.ndarray) -> np.ndarray:
    """The reference's table D[1:, 1:], every cell (the common case: no band)."""
    n, m = su.shape[0], pu.shape[0]
    table = np.empty((n, m), dtype=np.float64)
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
    return table


@numba.njit(cache=True, nogil=True)
def _fill_band(
    cost: np.ndarray, su: np.ndarray, pu: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """The same table, only within [lo[i], hi[i]) of each row (stored from column lo[i])."""
    n = su.shape[0]
    width = 0
    for i in range(n):
        width = max(width, hi[i] - lo[i])
    table = np.empty((n, width), dtype=np.float64)
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
    return table


@numba.njit(cache=True, nogil=True)
def _align(ed, s_cp, s_off, p_cp, p_off, su, pu, lo, hi, full: bool):
    """Costs, table and walk back in one compiled call (each call from Python costs microseconds)."""
    return _dtw(_costs(ed, s_cp, s_off, p_cp, p_off), su, pu, lo, hi, full)


@numba.njit(cache=True, nogil=True)
def _dtw(cost: np.ndarray, su: np.ndarray, pu: np.ndarray, lo: np.ndarray, hi: np.ndarray, full: bool):
    """Fill the (banded) table and walk back; return the alignment as (indptr, indices) by pivot."""
    n, m = su.shape[0], pu.shape[0]
    if full:
        lo = np.zeros(n, dtype=np.int64)
        hi = np.full(n, m, dtype=np.int64)
        table = _fill_full(cost, su, pu)
    else:
        table = _fill_band(cost, su, pu, lo, hi)
    path_i = np.empty(n + m, dtype=np.int64)
    path_j = np.empty(n + m, dtype=np.int64)
    i, j, steps = n - 1, m - 1, 0
    while i > 0 or j > 0:
        path_i[steps], path_j[steps] = i, j
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
    path_i[steps], path_j[steps] = 0, 0
    steps += 1
    indptr = np.zeros(m + 1, dtype=np.int64)
    indices = np.empty(steps, dtype=np.int64)
    for k in range(steps):
        indptr[path_j[k] + 1] += 1
    for c in range(m):
        indptr[c + 1] += indptr[c]
    for k in range(steps):  # the path was recorded backwards: reversed, it is ascending in i and j
        indices[steps - 1 - k] = path_i[k]
    return indptr, indices


def _distinct(tokens: list[str], marker: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Distinct marker-free strings, each position's index into them, and their code points (CSR).

    Raw strings are deduplicated first (C-level dict work), so only distinct ones are stripped; two raw
    strings that strip to the same text just cost one more row of distances, never a different result.
    """
    raw = list(dict.fromkeys(tokens))
    where = {t: k for k, t in enumerate(raw)}
    codes = np.fromiter(map(where.__getitem__, tokens), dtype=np.int64, count=len(tokens))
    uniq = [t.replace(marker, "") for t in raw] if marker else raw
    lens = np.fromiter(map(len, uniq), dtype=np.int64, count=len(uniq))
    off = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    cp = np.frombuffer("".join(uniq).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return uniq, codes, cp, off


def _band_limits(n: int, m: int, band: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per source row, the pivot columns [lo, hi) that are computed: all of them, or a diagonal band.

    The band follows the line from (0, 0) to (n-1, m-1) and is widened to the slope so that a path
    always exists; within it the result equals the unbanded one whenever the optimal path stays inside.
    """
    if band is None or band >= m:
        return np.zeros(n, dtype=np.int64), np.full(n, m, dtype=np.int64)
    if band < 1:
        raise ValueError(f"band must be >= 1, got {band}")
    slope = (m - 1) / (n - 1) if n > 1 else 0.0
    half = max(band, math.ceil(slope) + 1)
    centre = np.arange(n, dtype=np.float64) * slope
    lo = np.clip(np.floor(centre - half), 0, m - 1).astype(np.int64)
    hi = np.clip(np.ceil(centre + half) + 1, 1, m).astype(np.int64)
    hi[-1] = m
    return lo, hi


def mined_cost(a: str, b: str) -> float:
    """The reference's per-pair cost on already-stripped strings (for hand checks and the stats mapping)."""
    weight = 0.1 if a in b or b in a else 1
    return Levenshtein.distance(a, b) * weight


def dtw_alignment(
    source_tokens: list[str],
    pivot_tokens: list[str],
    *,
    source_marker: str,
    pivot_marker: str,
    band: int | None = None,
) -> Alignment:
    """MinED alignment as an `Alignment` (see `dtw_align` for the arguments)."""
    n, m = len(source_tokens), len(pivot_tokens)
    if n == 0 or m == 0:
        return Alignment(np.zeros(m + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), n)
    s_uniq, su, s_cp, s_off = _distinct(source_tokens, source_marker)
    p_uniq, pu, p_cp, p_off = _distinct(pivot_tokens, pivot_marker)
    ed = cdist(s_uniq, p_uniq, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    full = band is None or band >= m
    lo, hi = (_NO_BAND, _NO_BAND) if full else _band_limits(n, m, band)
    indptr, indices = _align(ed, s_cp, s_off, p_cp, p_off, su, pu, lo, hi, full)
    return Alignment(indptr, indices, n)


def dtw_align(
    source_tokens: list[str],
    pivot_tokens: list[str],
    *,
    source_marker: str,
    pivot_marker: str,
    band: int | None = None,
) -> list[list[int]]:
    """Align source tokens to pivot tokens by minimum edit distance (FuseChat's MinED "dtw").

    Args:
        source_tokens: the source model's tokens, as `tokenizer.convert_ids_to_tokens` returns them.
        pivot_tokens: the pivot model's tokens of the same text.
        source_marker: the source tokenizer's word-start marker ('▁', 'Ġ', or '').
        pivot_marker: the pivot tokenizer's word-start marker.
        band: compute only cells within this many columns of the diagonal (long texts); `None`: all.

    Returns:
        For each pivot position, the ascending source positions aligned to it.
    """
    return dtw_alignment(
        source_tokens, pivot_tokens, source_marker=source_marker, pivot_marker=pivot_marker, band=band
    ).to_lists()


@ALIGNMENT_METHODS.register(
    "dtw", pretty_name="MinED dynamic-programming alignment", reference_url="https://arxiv.org/abs/2408.07990"
)
def dtw(source: TokenizedText, pivot: TokenizedText, *, band: int | None = None) -> Alignment:
    """Minimum-edit-distance token alignment of FuseChat (Wan et al., 2024), on token strings."""
    return dtw_alignment(
        source.tokens, pivot.tokens, source_marker=source.marker, pivot_marker=pivot.marker, band=band
    )
