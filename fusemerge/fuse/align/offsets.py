"""Token alignment by character spans ("offsets"): exact and linear, where both tokenizers are fast ones.

Both tokenizers see the same text, and a fast tokenizer reports which characters each token covers. A
pivot token is aligned to every source token whose span overlaps its own, so the text a pivot token
covers is always inside the text its aligned source tokens cover, and equal to it wherever the pivot's
token boundaries are also source boundaries. No edit distance is involved, so none of MinED's failure
modes (a lone marker swallowing a run of Chinese characters, BOS asymmetry) can occur. This is what
TRL's GOLD trainer moved to after string matching broke.

What the spans need before they can be compared:
- Byte-level BPE splits a multibyte character across tokens; each of those tokens reports the whole
  character's span, so they overlap each other and all align to whatever covers that character.
- SentencePiece's '▁' in front of a word covers the preceding space, or (at the start of the text,
  where it is prepended) nothing extra; either way its span is right.
- Some tokenizers trim whitespace off spans (`trim_offsets`), leaving gaps; a gap is given to the token
  after it, so the spans tile the text.
- BOS/EOS and other added tokens without a span are zero-width. They are anchored where they occur
  (the end of the text covered before them) and numbered within a run there; a zero-width pivot token
  is aligned to the zero-width source token with the same anchor and number, if any (BOS to BOS), and
  otherwise to nothing (its distribution then falls back to the next gold token).
"""

from __future__ import annotations

import numba
import numpy as np

from fusemerge.errors import FusemergeError
from fusemerge.fuse.align.alignment import Alignment, TokenizedText, check_offsets
from fusemerge.fuse.align.registry import ALIGNMENT_METHODS


@numba.njit(cache=True, nogil=True)
def _prepare(off: np.ndarray, weight: np.ndarray, char_to_byte: np.ndarray):
    """Spans in bytes (or characters), overlaps within one side spread out; ok=False: not monotone.

    Tokens of one side whose spans overlap (the pieces of a multibyte character, SentencePiece's
    prepended '▁' with the character after it) form a cluster; the cluster's range is laid out over
    them in order, in proportion to their weights (byte lengths), exactly so when the weights add up
    to the range. A token left with no width is treated like BOS: anchored, not overlapping.
    """
    n = off.shape[0]
    start = np.empty(n, dtype=np.float64)
    end = np.empty(n, dtype=np.float64)
    real = np.zeros(n, dtype=np.bool_)
    bytes_known = char_to_byte.shape[0] > 0
    reach, last_start, ok = 0.0, 0.0, True
    k = 0
    while k < n:
        a, b = off[k, 0], off[k, 1]
        if b <= a:
            k += 1
            continue
        fa = float(char_to_byte[a]) if bytes_known else float(a)
        fb = float(char_to_byte[b]) if bytes_known else float(b)
        if fa < last_start or fb < reach:
            ok = False
        last_start = fa
        lo = fa if fa < reach else reach  # a gap left by trimmed whitespace goes to the token after it
        hi = fb
        total = weight[k]
        k_end = k + 1
        while k_end < n and off[k_end, 1] > off[k_end, 0]:
            na = float(char_to_byte[off[k_end, 0]]) if bytes_known else float(off[k_end, 0])
            if na >= hi:
                break
            nb = float(char_to_byte[off[k_end, 1]]) if bytes_known else float(off[k_end, 1])
            if na < last_start or nb < hi:
                ok = False
            last_start = na
            hi = nb
            total += weight[k_end]
            k_end += 1
        if k_end == k + 1:
            start[k], end[k], real[k] = lo, hi, True
        else:
            even = total == 0
            units = float(k_end - k) if even else float(total)
            scale = 1.0 if (bytes_known and units == hi - lo) else (hi - lo) / units
            pos = lo
            for t in range(k, k_end):
                width = (1.0 if even else float(weight[t])) * scale
                start[t] = pos
                pos = hi if t == k_end - 1 else pos + width
                end[t] = pos
                real[t] = end[t] > start[t]
        reach = hi
        k = k_end
    anchor = np.full(n, -1.0, dtype=np.float64)
    number = np.zeros(n, dtype=np.int64)
    reach, run = 0.0, 0
    for k in range(n):
        if real[k]:
            reach = end[k]
            run = 0
        else:
            anchor[k] = start[k] if off[k, 1] > off[k, 0] else reach
            number[k] = run
            run += 1
    return start, end, real, anchor, number, ok


@numba.njit(cache=True, nogil=True)
def _push(indices: np.ndarray, nnz: int, value: int) -> np.ndarray:
    if nnz == indices.shape[0]:
        grown = np.empty(2 * nnz, dtype=np.int64)
        grown[:nnz] = indices
        indices = grown
    indices[nnz] = value
    return indices


@numba.njit(cache=True, nogil=True)
def _overlaps(s_off, s_weight, p_off, p_weight, char_to_byte):
    s_start, s_end, s_real, s_anchor, s_number, s_ok = _prepare(s_off, s_weight, char_to_byte)
    p_start, p_end, p_real, p_anchor, p_number, p_ok = _prepare(p_off, p_weight, char_to_byte)
    n, m = s_off.shape[0], p_off.shape[0]
    indptr = np.zeros(m + 1, dtype=np.int64)
    indices = np.empty(max(16, n + 2 * m), dtype=np.int64)
    if not (s_ok and p_ok):
        return indptr, indices[:0], False
    nnz, lo, zlo = 0, 0, 0
    for j in range(m):
        if p_real[j]:  # every source token with text overlapping it
            a, b = p_start[j], p_end[j]
            while lo < n and (not s_real[lo] or s_end[lo] <= a):
                lo += 1
            k = lo
            while k < n:
                if s_real[k]:
                    if s_start[k] >= b:
                        break
                    indices = _push(indices, nnz, k)
                    nnz += 1
                k += 1
        else:  # no width: the source token without width at the same anchor, with the same number
            while zlo < n and (
                s_real[zlo]
                or s_anchor[zlo] < p_anchor[j]
                or (s_anchor[zlo] == p_anchor[j] and s_number[zlo] < p_number[j])
            ):
                zlo += 1
            if zlo < n and s_anchor[zlo] == p_anchor[j] and s_number[zlo] == p_number[j]:
                indices = _push(indices, nnz, zlo)
                nnz += 1
        indptr[j + 1] = nnz
    return indptr, indices[:nnz], True


def char_to_byte_offsets(text: str) -> np.ndarray:
    """UTF-8 byte position of every character boundary of `text` (length len(text) + 1)."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(width, out=out[1:])
    return out


def offsets_alignment(
    source_offsets: np.ndarray,
    pivot_offsets: np.ndarray,
    *,
    text: str | None = None,
    source_weights: np.ndarray | None = None,
    pivot_weights: np.ndarray | None = None,
) -> Alignment:
    """Align by character spans (`return_offsets_mapping`) of the same text.

    Args:
        source_offsets: int [n, 2] character spans of the source tokens.
        pivot_offsets: int [m, 2] character spans of the pivot tokens.
        text: the text both were computed on; with it, spans are measured in UTF-8 bytes, so the pieces
            of a multibyte character split by byte-level BPE get their exact share of it.
        source_weights, pivot_weights: byte length of each token's piece (0 for SentencePiece's lone
            prepended '▁'); they share out a character between the tokens that cover it. Default 1.
    """
    s_off = check_offsets(source_offsets, side="source")
    p_off = check_offsets(pivot_offsets, side="pivot")
    cb = char_to_byte_offsets(text) if text is not None else np.zeros(0, dtype=np.int64)
    if len(cb) and max(int(s_off.max(initial=0)), int(p_off.max(initial=0))) >= len(cb):
        raise FusemergeError("offset mappings reach past the end of the text they were computed on")
    s_w = _weights(source_weights, len(s_off), "source")
    p_w = _weights(pivot_weights, len(p_off), "pivot")
    indptr, indices, ok = _overlaps(s_off, s_w, p_off, p_w, cb)
    if not ok:
        raise FusemergeError(
            "offset mappings go backwards, so they are not spans of one text in order: use tokens: dtw",
            key="alignment.tokens",
        )
    return Alignment(indptr, indices, len(s_off))


def byte_spans(tokenized: TokenizedText) -> tuple[np.ndarray, np.ndarray] | None:
    """Each token's [start, end) in UTF-8 bytes of the text, as `offsets` lays them out; NaN for tokens
    without width (BOS, EOS); `None` without character spans or where they go backwards.

    The pieces of a multibyte character share its bytes by weight, so their bounds may be fractional;
    the span rules of `spans: chain` (`fusemerge.fuse.align.transfer`) use whole-byte bounds only.
    """
    if tokenized.offsets is None or tokenized.text is None:
        return None
    off = check_offsets(tokenized.offsets, side="token")
    cb = char_to_byte_offsets(tokenized.text)
    if len(off) and int(off.max(initial=0)) >= len(cb):
        return None
    start, end, real, _, _, ok = _prepare(off, _weights(tokenized.weights, len(off), "token"), cb)
    if not ok:
        return None
    return np.where(real, start, np.nan), np.where(real, end, np.nan)


def _weights(weights: np.ndarray | None, n: int, side: str) -> np.ndarray:
    if weights is None:
        return np.ones(n, dtype=np.int64)
    w = np.ascontiguousarray(weights, dtype=np.int64)
    if w.shape != (n,):
        raise ValueError(f"{side} weights have shape {w.shape}, expected ({n},)")
    return w


@ALIGNMENT_METHODS.register(
    "offsets",
    pretty_name="character-span alignment",
    reference_url="https://huggingface.co/docs/trl/main/en/gold_trainer",
)
def offsets(source: TokenizedText, pivot: TokenizedText) -> Alignment:
    """Exact alignment by fast tokenizers' character spans, as in TRL's GOLD trainer."""
    return offsets_alignment(
        check_offsets(source.offsets, side="source"),
        check_offsets(pivot.offsets, side="pivot"),
        text=pivot.text if pivot.text is not None else source.text,
        source_weights=source.weights,
        pivot_weights=pivot.weights,
    )
