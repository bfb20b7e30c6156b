"""MinED token alignment ("dtw"), bit-for-bit the FuseChat reference, compiled.

The reference (`FuseChat/train/align_token_and_vocab.py`, `dtw` + `transform_step_token`) fills an
(n+1) x (m+1) table in a Python double loop, calling an edit distance per cell:

    cost(s, p) = ed(s', p') * (0.1 if s' in p' or p' in s' else 1)   with s' = s.replace(source_marker, "")
    D[i+1][j+1] = cost(s_i, p_j) + min(D[i][j+1], D[i+1][j], D[i][j]),  D[0][0] = 0, other borders inf

then walks back from (n-1, m-1) over D[1:, 1:], taking `np.argmin([diag, up, left])` (ties: diagonal,
then up, then left) and collects, for each pivot position, the source positions on the path.

Here the Python side only numbers a *batch* of (source, pivot) pairs' token strings once (`_intern`; a
single pair is a batch of one) and everything after that runs in one numba call (`dtw_kernel.align_pairs`):
each distinct string pair's edit distance is computed once for the whole batch (a teacher pass repeats
the same tokens across conversations), and every table is filled and walked back, with the reference's
floats, so the result is the same alignment, ties included. An optional band keeps long texts linear in
memory.

Entry points, from the recipe's down to the reference's shape:
`dtw` / `dtw_batch` (registered as `alignment.tokens: dtw`, on `TokenizedText`), `dtw_alignment` /
`dtw_alignment_batch` (token strings -> `Alignment`), `dtw_align` / `dtw_align_batch` (token strings ->
the reference's lists), and `mined_cost` (one string pair's cost, for hand checks and the stats mapping).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import accumulate, chain

import numpy as np
from rapidfuzz.distance import Levenshtein

from fusemerge.fuse.align.alignment import Alignment, TokenizedText
from fusemerge.fuse.align.dtw_kernel import align_pairs, peq_scratch
from fusemerge.fuse.align.registry import ALIGNMENT_METHODS

# a batch whose distance memo (distinct source x distinct pivot strings) would outgrow this is split
_MEMO_BYTES = 64 << 20


def _intern(
    seqs: Sequence[list[str]], marker: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One side of a batch: every token as an id into the batch's distinct strings (flat), each
    sequence's start in that flat array, and the distinct strings with the marker removed (code points,
    CSR). Numbering is one C-level dict pass over the whole batch, so only distinct strings are stripped
    and encoded; two raw strings that strip to the same text only cost a memo row, never a different result.
    Last, the longest stripped string's length (it bounds every edit distance).
    """
    seq = np.fromiter(accumulate(map(len, seqs), initial=0), dtype=np.int64, count=len(seqs) + 1)
    where: defaultdict[str, int] = defaultdict()
    where.default_factory = where.__len__  # a new string gets the next id: one C-level pass numbers all
    ids = np.fromiter(map(where.__getitem__, chain.from_iterable(seqs)), dtype=np.int64, count=int(seq[-1]))
    uniq = [t.replace(marker, "") for t in where] if marker else list(where)
    off = np.fromiter(accumulate(map(len, uniq), initial=0), dtype=np.int64, count=len(uniq) + 1)
    cp = np.frombuffer("".join(uniq).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return ids, seq, cp, off, max(map(len, uniq), default=0)


def dtw_alignment_batch(
    pairs: Sequence[tuple[list[str], list[str]]],
    *,
    source_marker: str,
    pivot_marker: str,
    band: int | None = None,
) -> list[Alignment]:
    """`dtw_alignment` of every (source tokens, pivot tokens) pair, identical results, one compiled call.

    A 30-token conversation aligns in a few microseconds of compiled work but costs tens of microseconds
    of Python around it per call; here the token strings of the whole batch are deduplicated once, each
    distinct string pair's edit distance is computed once (a teacher pass repeats the same tokens across
    conversations), and all tables are filled and walked back in one numba call.
    """
    if not pairs:
        return []
    sources = [s for s, _ in pairs]
    pivots = [p for _, p in pairs]
    s_ids, s_seq, s_cp, s_off, s_longest = _intern(sources, source_marker)
    p_ids, p_seq, p_cp, p_off, p_longest = _intern(pivots, pivot_marker)
    ns, np_ = len(s_off) - 1, len(p_off) - 1
    dtype = np.int8 if 2 * max(s_longest, p_longest) + 1 <= 127 else np.int32  # memo holds 2 * ed + 1
    if ns * np_ * np.dtype(dtype).itemsize > _MEMO_BYTES and len(pairs) > 1:
        half = len(pairs) // 2  # too many distinct strings for one memo: two batches, each its own
        kw = {"source_marker": source_marker, "pivot_marker": pivot_marker, "band": band}
        return dtw_alignment_batch(pairs[:half], **kw) + dtw_alignment_batch(pairs[half:], **kw)
    if band is not None and band < 1 and bool(np.any((np.diff(s_seq) > 0) & (np.diff(p_seq) > 0))):
        raise ValueError(f"band must be >= 1, got {band}")
    memo = np.full((ns, np_), -1, dtype=dtype)
    indptr, indices, starts = align_pairs(
        s_ids,
        s_seq,
        s_cp,
        s_off,
        p_ids,
        p_seq,
        p_cp,
        p_off,
        memo,
        peq_scratch(),
        -1 if band is None else band,
    )
    s_len, p_at, at = s_seq.tolist(), p_seq.tolist(), starts.tolist()
    return [
        Alignment(
            indptr[p_at[k] + k : p_at[k + 1] + k + 1], indices[at[k] : at[k + 1]], s_len[k + 1] - s_len[k]
        )
        for k in range(len(pairs))
    ]


def dtw_align_batch(
    pairs: Sequence[tuple[list[str], list[str]]],
    *,
    source_marker: str,
    pivot_marker: str,
    band: int | None = None,
) -> list[list[list[int]]]:
    """`dtw_align` of every (source tokens, pivot tokens) pair, in one compiled call (see
    `dtw_alignment_batch`); all sources share `source_marker`, all pivots `pivot_marker`."""
    return [
        a.to_lists()
        for a in dtw_alignment_batch(pairs, source_marker=source_marker, pivot_marker=pivot_marker, band=band)
    ]


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
    """MinED alignment as an `Alignment` (see `dtw_align` for the arguments): a batch of one."""
    return dtw_alignment_batch(
        [(source_tokens, pivot_tokens)], source_marker=source_marker, pivot_marker=pivot_marker, band=band
    )[0]


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


def dtw_batch(
    pairs: Sequence[tuple[TokenizedText, TokenizedText]], *, band: int | None = None
) -> list[Alignment]:
    """`dtw` over many (source, pivot) pairs: one `dtw_alignment_batch` call per marker combination
    (a corpus normally has one: every source from one tokenizer, every pivot from another)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for k, (source, pivot) in enumerate(pairs):
        groups[source.marker, pivot.marker].append(k)
    out: dict[int, Alignment] = {}
    for (source_marker, pivot_marker), where in groups.items():
        done = dtw_alignment_batch(
            [(pairs[k][0].tokens, pairs[k][1].tokens) for k in where],
            source_marker=source_marker,
            pivot_marker=pivot_marker,
            band=band,
        )
        out.update(zip(where, done, strict=True))
    return [out[k] for k in range(len(pairs))]


@ALIGNMENT_METHODS.register(
    "dtw",
    pretty_name="MinED dynamic-programming alignment",
    reference_url="https://arxiv.org/abs/2408.07990",
    batch=dtw_batch,
)
def dtw(source: TokenizedText, pivot: TokenizedText, *, band: int | None = None) -> Alignment:
    """Minimum-edit-distance token alignment of FuseChat (Wan et al., 2024), on token strings."""
    return dtw_alignment(
        source.tokens, pivot.tokens, source_marker=source.marker, pivot_marker=pivot.marker, band=band
    )
