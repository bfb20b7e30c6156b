"""Distribution transfer: a source model's top-K at each position, moved onto pivot positions and ids.

The rules, after the FuseChat reference (`transform_step_logits`):
- A pivot position aligned to exactly one source position takes that position's top-K; the source ids
  go through the vocabulary mapping, and where several land on one pivot id the highest log-prob wins.
- A pivot position aligned to several source positions takes the one whose piece equals the pivot
  token's, else the first whose piece contains it; otherwise it has no teacher distribution. A pivot
  token that is only a word-start marker (or empty) matches nothing: it is contained in everything.
- A position with no teacher distribution (none aligned, no piece chosen, no id mapped) falls back to
  the one-hot of the *next* gold pivot token, the token it is trained to predict. The released v1 code
  used the current token there, an off-by-one its users reported.
- With character spans (`alignment.tokens: offsets`) one more rule applies: the chosen source token
  must end where the pivot token ends (`same_end`). A next-token distribution predicts the text after
  its token; where the two tokens end apart, the source's predicts what follows a different prefix
  (source "(self" vs pivot "(": "," instead of "self"), a confidently wrong target. MinED cannot tell,
  which is why the paper's rule takes any one-to-one pair; spans can, so they do.
Log-probs are kept as the source gave them (not renormalised): dropped ids leave the sum below 1.

`spans: chain` (the default; `exact` is the rules above alone) covers what those rules leave uncovered
where both tokenizers' spans allow it, by the chain rule P(a b) = P(a) P(b | a) on the teacher's own
top-K, as TRL's GOLD trainer merges the probabilities of an alignment group
(`GOLDTrainer._merge_probabilities_with_alignment_groups`, https://huggingface.co/docs/trl/main/en/gold_trainer):
- n-to-1, a pivot token covering several source tokens: the distribution at its last piece, which
  predicts what follows the same text (dtw: where no piece matched; offsets: the piece ending with it).
- 1-to-n, one source token covering several pivot tokens (offsets only): a pivot token ending inside
  source token s_i has consumed c, a prefix of it. Row i-1 of the teacher predicted s_i; its candidates
  that start with c give P(next pivot token = x | c) = sum P(v) over the candidates v continuing c with
  x / sum P(v) over all candidates starting with c (x: the pivot piece the rest of v starts with).
  Candidates equal to c leave mass for a token no row predicts, so the row sums to less than 1.
- A next pivot token that several source tokens spell (offsets only): its entry in the row before it
  takes the teacher's chain-rule probability of that text, the product of each piece's probability in
  the row before the piece (GOLD's merge for a teacher group), in place of the first piece's alone,
  which overstates it; where a piece is not in its row's top-K the row is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fusemerge.fuse.align.alignment import Alignment


@dataclass(frozen=True)
class TransferredTopK:
    """Per pivot position: up to K pivot ids (-1 pads) and log-probs (-inf pads), best first."""

    ids: np.ndarray  # int64 [m, K]
    logprobs: np.ndarray  # float32 [m, K]
    from_teacher: np.ndarray  # bool [m]: False where the next-gold one-hot was used


SPAN_RULES = ("exact", "chain")  # the recipe's `alignment.spans`


@dataclass(frozen=True)
class SpanText:
    """What the span rules of `spans: chain` read about one sequence pair (`tokens: offsets` only).

    Byte bounds come from `fusemerge.fuse.align.offsets.byte_spans` (NaN: a token without width).
    """

    text: str  # the text's UTF-8 bytes, one latin-1 character per byte, as canonical pieces are
    source_ids: np.ndarray  # int [n] the source's own tokens
    source_start: np.ndarray  # float [n]
    source_end: np.ndarray  # float [n]
    pivot_start: np.ndarray  # float [m]
    pivot_end: np.ndarray  # float [m]
    source_vocab: Sequence[str | None]  # canonical piece of every source id (`TokenizerProfile.pieces`)
    first_piece: Callable[[str], int]  # pivot id a text starts with (`fusemerge.fuse.align.vocab.FirstPiece`)


def choose_source_positions(
    alignment: Alignment,
    *,
    pivot_pieces: Sequence[str | None] | None = None,
    source_pieces: Sequence[str | None] | None = None,
) -> np.ndarray:
    """For every pivot position, the one source position whose distribution it takes, or -1.

    Args:
        alignment: pivot -> source positions.
        pivot_pieces, source_pieces: comparable text of each position's token (canonical pieces, where
            the markers are spaces); needed only where a pivot token is aligned to several source tokens.
    """
    counts = alignment.counts
    chosen = np.full(alignment.pivot_len, -1, dtype=np.int64)
    single = counts == 1
    chosen[single] = alignment.indices[alignment.indptr[:-1][single]]
    several = np.flatnonzero(counts > 1)
    if len(several) == 0 or pivot_pieces is None or source_pieces is None:
        return chosen
    for j in several.tolist():
        target = pivot_pieces[j]
        if target is None or target.strip(" ") == "":
            continue
        candidates = alignment[j].tolist()
        pieces = [source_pieces[i] for i in candidates]
        pick = next((i for i, p in zip(candidates, pieces, strict=True) if p == target), None)
        if pick is None:
            pick = next((i for i, p in zip(candidates, pieces, strict=True) if p and target in p), None)
        if pick is not None:
            chosen[j] = pick
    return chosen


def same_end(chosen: np.ndarray, source_ends: np.ndarray, pivot_ends: np.ndarray) -> np.ndarray:
    """`chosen` with -1 wherever the chosen source token does not end where the pivot token ends.

    Args:
        chosen: int [m] source position per pivot position, or -1 (`choose_source_positions`).
        source_ends, pivot_ends: end of each token's span (character or byte offsets, same unit).
    """
    rows = np.where(chosen >= 0, chosen, 0)
    ok = (chosen >= 0) & (np.asarray(source_ends)[rows] == np.asarray(pivot_ends))
    return np.where(ok, chosen, -1)


def last_pieces(alignment: Alignment, chosen: np.ndarray) -> np.ndarray:
    """`chosen` with the last aligned source position wherever several are aligned and none was chosen
    (n-to-1: the distribution that predicts what follows the whole pivot token)."""
    counts = alignment.counts
    fill = (chosen < 0) & (counts > 1)
    out = chosen.copy()
    out[fill] = alignment.indices[alignment.indptr[1:][fill] - 1]
    return out


def transfer_topk(
    alignment: Alignment,
    source_ids: np.ndarray,
    source_logprobs: np.ndarray,
    mapping: np.ndarray | object,
    pivot_ids: np.ndarray,
    *,
    pivot_pieces: Sequence[str | None] | None = None,
    source_pieces: Sequence[str | None] | None = None,
    source_ends: np.ndarray | None = None,
    pivot_ends: np.ndarray | None = None,
    spans: str = "chain",
    span_text: SpanText | None = None,
) -> TransferredTopK:
    """Move a source sequence's top-K onto the pivot sequence.

    Args:
        alignment: pivot -> source positions for this sequence pair.
        source_ids: int [n, K] top-K source ids at each source position.
        source_logprobs: float [n, K] their log-probabilities.
        mapping: a `VocabMapping` (callable) or an int array source id -> pivot id (-1: none).
        pivot_ids: int [m] the pivot's own token ids (the gold sequence) for the one-hot fallback.
        pivot_pieces, source_pieces: token pieces for the one-to-many rule (`choose_source_positions`).
        source_ends, pivot_ends: where each token's span ends; given both, the same-end rule applies.
        spans: `exact` (the rules above) or `chain` (also the span rules of this module's docstring).
        span_text: byte spans and pieces for the 1-to-n and chain-rule parts of `chain`; without it,
            `chain` adds the n-to-1 rule alone.
    """
    if spans not in SPAN_RULES:
        raise ValueError(f"spans must be one of {SPAN_RULES}, got {spans!r}")
    source_ids = np.asarray(source_ids, dtype=np.int64)
    source_logprobs = np.asarray(source_logprobs, dtype=np.float32)
    pivot_ids = np.asarray(pivot_ids, dtype=np.int64)
    m, k = alignment.pivot_len, source_ids.shape[1]
    if source_ids.shape != source_logprobs.shape or source_ids.shape[0] != alignment.source_len:
        raise ValueError(
            f"top-K of shape {source_ids.shape} / {source_logprobs.shape} for {alignment.source_len} "
            "source positions"
        )
    if pivot_ids.shape != (m,):
        raise ValueError(f"{len(pivot_ids)} pivot ids for {m} pivot positions")
    chosen = choose_source_positions(alignment, pivot_pieces=pivot_pieces, source_pieces=source_pieces)
    if spans == "chain":
        chosen = last_pieces(alignment, chosen)
    if source_ends is not None and pivot_ends is not None:
        chosen = same_end(chosen, source_ends, pivot_ends)
    rows = np.where(chosen >= 0, chosen, 0)
    ids = _map(mapping, source_ids[rows])
    lp = np.where((chosen[:, None] >= 0) & (ids >= 0), source_logprobs[rows], -np.inf).astype(np.float32)
    chain = spans == "chain" and span_text is not None and k > 0
    if chain:
        _chain_next_token(ids, lp, chosen, source_ids, source_logprobs, pivot_ids, span_text)
    ids = np.where(np.isfinite(lp), ids, -1)
    ids, lp = _max_per_id(ids, lp)
    if chain:
        _inside_source_token(ids, lp, source_ids, source_logprobs, span_text)
    from_teacher = ids[:, 0] >= 0 if k else np.zeros(m, dtype=bool)
    fallback = np.flatnonzero(~from_teacher)
    nxt = fallback[fallback + 1 < m]
    ids[fallback] = -1
    lp[fallback] = -np.inf
    if k:
        ids[nxt, 0] = pivot_ids[nxt + 1]
        lp[nxt, 0] = 0.0
    return TransferredTopK(ids, lp, from_teacher)


def _whole(x: np.ndarray) -> np.ndarray:
    """Whole-byte bounds (NaN, a token without width, and a shared multibyte character's share: no)."""
    return x == np.floor(x)


def _reach(ends: np.ndarray) -> np.ndarray:
    """How far the tokens up to each one reach (ascending; tokens without width add nothing)."""
    finite = np.where(np.isnan(ends), -np.inf, ends)
    return np.maximum.accumulate(finite) if len(finite) else finite


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    top = max(a, b)
    return top + math.log1p(math.exp(-abs(a - b)))


def _chain_next_token(
    ids: np.ndarray,
    lp: np.ndarray,
    chosen: np.ndarray,
    source_ids: np.ndarray,
    source_logprobs: np.ndarray,
    pivot_ids: np.ndarray,
    span: SpanText,
) -> None:
    """In place, before the per-id maximum: where the next pivot token is spelt by source tokens
    r+1..b (b > r+1) after the chosen row r, the candidate s_{r+1} of row r becomes that pivot token,
    with the chain-rule log-probability sum_k log P(s_k | row k-1) (GOLD's merge of a teacher group)."""
    s_start, s_end, p_start, p_end = span.source_start, span.source_end, span.pivot_start, span.pivot_end
    n, m = len(s_end), len(chosen)
    if m < 2 or n < 3:
        return
    r = chosen[:-1]
    a, e = p_start[1:], p_end[1:]  # the next pivot token's bytes
    rr = np.where(r >= 0, r, 0)
    r1 = np.minimum(rr + 1, n - 1)
    b = np.searchsorted(_reach(s_end), e, side="left")  # first source token reaching e
    bb = np.minimum(b, n - 1)
    widthless = np.concatenate([[0], np.cumsum(np.isnan(s_end))])
    ok = (r >= 0) & _whole(a) & _whole(e) & (rr + 2 < n) & (s_end[rr] == a) & (s_start[r1] == a)
    ok &= (b < n) & (s_end[bb] == e) & (b >= rr + 2) & (widthless[bb + 1] == widthless[r1])
    for j in np.flatnonzero(ok).tolist():
        first, last = int(r[j]) + 1, int(b[j])
        total = 0.0
        for t in range(first, last + 1):
            hit = np.flatnonzero(source_ids[t - 1] == span.source_ids[t])
            if len(hit) == 0 or not np.isfinite(source_logprobs[t - 1, hit[0]]):
                break
            total += float(source_logprobs[t - 1, hit[0]])
        else:
            slot = np.flatnonzero(source_ids[first - 1] == span.source_ids[first])[0]
            ids[j, slot] = pivot_ids[j + 1]
            lp[j, slot] = total


def _inside_source_token(
    ids: np.ndarray, lp: np.ndarray, source_ids: np.ndarray, source_logprobs: np.ndarray, span: SpanText
) -> None:
    """In place, on rows still without a teacher distribution: a pivot token ending inside source token
    s_i takes P(next pivot token | the consumed prefix c of s_i) from row i-1's candidates (the 1-to-n
    rule of the module docstring). Collisions on one pivot id add up: they are one event here."""
    s_start, s_end, n = span.source_start, span.source_end, len(span.source_end)
    rows = np.flatnonzero(ids[:, 0] < 0)
    if n < 2 or len(rows) == 0:
        return
    e = span.pivot_end[rows]
    i = np.searchsorted(_reach(s_end), e, side="right")  # first source token reaching past e
    ic = np.clip(i, 0, n - 1)
    ok = _whole(e) & (i >= 1) & (i < n) & _whole(s_start[ic]) & (s_start[ic] < e) & (e < s_end[ic])
    vocab, k = span.source_vocab, ids.shape[1]
    for j, src, end in zip(rows[ok].tolist(), i[ok].tolist(), e[ok].tolist(), strict=True):
        c = span.text[int(s_start[src]) : int(end)]
        den = -math.inf
        num: dict[int, float] = {}
        for v, lv in zip(source_ids[src - 1].tolist(), source_logprobs[src - 1].tolist(), strict=True):
            piece = vocab[v] if 0 <= v < len(vocab) else None
            if piece is None or lv == -math.inf or not piece.startswith(c):
                continue
            den = _logaddexp(den, lv)
            x = span.first_piece(piece[len(c) :]) if len(piece) > len(c) else -1
            if x >= 0:
                num[x] = _logaddexp(num.get(x, -math.inf), lv)
        if not num:
            continue
        best = sorted(num.items(), key=lambda item: -item[1])[:k]
        ids[j] = -1
        lp[j] = -np.inf
        for q, (x, lx) in enumerate(best):
            ids[j, q] = x
            lp[j, q] = lx - den


def _map(mapping: np.ndarray | object, ids: np.ndarray) -> np.ndarray:
    if callable(mapping):
        return np.asarray(mapping(ids), dtype=np.int64)
    table = np.asarray(mapping, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(table))
    return np.where(inside, table[np.where(inside, ids, 0)], -1)


def _max_per_id(ids: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within each row keep the highest log-prob of each id, then sort the row best first."""
    m, k = ids.shape
    if m == 0 or k == 0:
        return ids, lp
    row = np.repeat(np.arange(m), k)
    flat_ids, flat_lp = ids.ravel(), lp.ravel()
    order = np.lexsort((-flat_lp, flat_ids, row))  # per row, per id: best log-prob first
    dup = np.zeros(m * k, dtype=bool)
    dup[1:] = (row[order][1:] == row[order][:-1]) & (flat_ids[order][1:] == flat_ids[order][:-1])
    drop = order[dup | (flat_ids[order] < 0)]
    flat_lp = flat_lp.copy()
    flat_lp[drop] = -np.inf
    lp = flat_lp.reshape(m, k)
    best = np.argsort(-lp, axis=1, kind="stable")
    lp = np.take_along_axis(lp, best, axis=1)
    ids = np.where(np.isfinite(lp), np.take_along_axis(ids, best, axis=1), -1)
    return ids, lp
