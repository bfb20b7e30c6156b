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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fusemerge.fuse.align.alignment import Alignment


@dataclass(frozen=True)
class TransferredTopK:
    """Per pivot position: up to K pivot ids (-1 pads) and log-probs (-inf pads), best first."""

    ids: np.ndarray  # int64 [m, K]
    logprobs: np.ndarray  # float32 [m, K]
    from_teacher: np.ndarray  # bool [m]: False where the next-gold one-hot was used


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
    """
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
    if source_ends is not None and pivot_ends is not None:
        chosen = same_end(chosen, source_ends, pivot_ends)
    rows = np.where(chosen >= 0, chosen, 0)
    ids = _map(mapping, source_ids[rows])
    lp = np.where((chosen[:, None] >= 0) & (ids >= 0), source_logprobs[rows], -np.inf).astype(np.float32)
    ids = np.where(np.isfinite(lp), ids, -1)
    ids, lp = _max_per_id(ids, lp)
    from_teacher = ids[:, 0] >= 0 if k else np.zeros(m, dtype=bool)
    fallback = np.flatnonzero(~from_teacher)
    nxt = fallback[fallback + 1 < m]
    ids[fallback] = -1
    lp[fallback] = -np.inf
    if k:
        ids[nxt, 0] = pivot_ids[nxt + 1]
        lp[nxt, 0] = 0.0
    return TransferredTopK(ids, lp, from_teacher)


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
