"""Fusion functions: the teachers' top-K distributions at one sequence -> one sparse training target.

    from fusemerge.fuse.fusion import Candidate, fuse
    target = fuse("mince", [pivot, source], temperature=1.0)   # FuseChat's pairwise MinCE
    target.ids, target.probs                                     # [T, K'] pivot ids (-1 empty), q

Every candidate is a teacher already in the pivot's positions and vocabulary: the pivot's own top-K
store, or a source's *aligned* store (ids -1 where a slot is empty). Candidate 0 is always the pivot, so
"ties go to the pivot" is "ties go to the lowest index". A candidate's distribution at a row is
`q = softmax(z / T)` over its listed ids (z: the stored log-probs; -1 slots skipped), as the paper writes
it; a row with no listed id has no distribution.

Why here and not in the loss: fusion is per sequence, cheap, and runs in numpy inside the data collator
(CPU, data-loader workers), so the training step only sees the finished sparse target. Functions never
touch files or devices. A target row whose probabilities sum to 0 has no teacher; the loss then uses the
next gold token (it contributes like the CLM term).

`metric_ce` is what the sequence-level choices (mince, avgce, and mince_token's fallback) compare; the
collator fills it with the recipe's `fusion.metric` (`METRICS`): `ce_per_byte` by default, the summed NLL
of the assistant text over its UTF-8 bytes, or the paper's `ce_per_token`, the mean over assistant tokens.
Per token favours a finer tokenizer (more, easier predictions): a teacher that cuts code into more pieces
wins MinCE on code it models worse per byte than the pivot does.

Pairwise fusion (the paper: one target model per source) calls a function with {pivot, one source};
multi-source fusion (FuseLLM) calls it with the pivot and every source at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fusemerge.registry import Registry

PAPER_URL = "https://arxiv.org/abs/2402.16107"
FUSELLM_URL = "https://arxiv.org/abs/2401.10491"


@dataclass(frozen=True)
class Candidate:
    """One teacher's view of a sequence, in pivot positions and pivot vocabulary."""

    name: str
    ids: np.ndarray  # int [T, K]; -1 marks an empty slot
    logprobs: np.ndarray  # float [T, K]; log-probs of the listed ids (values at -1 slots are ignored)
    metric_ce: float  # the teacher's CE of the sequence, as `fusion.metric` measures it (NaN: none)


@dataclass(frozen=True)
class FusedTarget:
    """The target of one sequence: per row, pivot ids and probabilities (rows sum to 1, or 0: no teacher)."""

    ids: np.ndarray  # int64 [T, W]; -1 pads
    probs: np.ndarray  # float32 [T, W]; 0 at pads
    source: np.ndarray  # int16 [T]: the candidate each row came from; -1 mixed or none


# fusion.metric: what a sequence-level choice compares (fusemerge.fuse.store.TopKSequence.metric)
METRICS = ("ce_per_byte", "ce_per_token")
PAPER_METRIC = "ce_per_token"  # FuseChat's (and FuseLLM's) rule

FusionFn = Callable[..., FusedTarget]
FUSION_FUNCTIONS: Registry[FusionFn] = Registry("fusion function")


def fuse(
    name: str,
    candidates: Sequence[Candidate],
    *,
    temperature: float = 1.0,
    next_ids: np.ndarray | None = None,
) -> FusedTarget:
    """Fuse with the registered function `name` (the recipe's `fusion.function`).

    Args:
        name: mince | mince_token | avgce.
        candidates: the pivot first, then the sources; every one with the same number of rows.
        temperature: T in softmax(z / T).
        next_ids: int [T] the gold next pivot token per row (-1 none); mince_token needs it.
    """
    rows = {len(c.ids) for c in candidates}
    if not candidates or len(rows) != 1:
        raise ValueError(f"candidates must share their row count, got {[len(c.ids) for c in candidates]}")
    fn = FUSION_FUNCTIONS.get(name, key="fusion.function").fn
    return fn(candidates, temperature=temperature, next_ids=next_ids)


def distribution(ids: np.ndarray, logprobs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """q = softmax(z / T) over each row's listed ids (float32, 0 at -1 slots and on rows with none)."""
    listed = np.asarray(ids) >= 0
    z = np.where(listed, np.asarray(logprobs, dtype=np.float32) / np.float32(temperature), -np.inf)
    top = np.max(z, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(listed, np.exp(z - top), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)


def _single(candidates: Sequence[Candidate], choice: np.ndarray, temperature: float) -> FusedTarget:
    """Row t takes candidate choice[t] (-1: no teacher)."""
    t = len(choice)
    k = max(c.ids.shape[1] for c in candidates)
    ids = np.full((t, k), -1, dtype=np.int64)
    probs = np.zeros((t, k), dtype=np.float32)
    for index, cand in enumerate(candidates):
        rows = np.flatnonzero(choice == index)
        if len(rows):
            width = cand.ids.shape[1]
            ids[rows, :width] = np.where(cand.ids[rows] >= 0, cand.ids[rows], -1)
            probs[rows, :width] = distribution(cand.ids[rows], cand.logprobs[rows], temperature)
    return FusedTarget(ids, probs, choice.astype(np.int16))


def sequence_choice(candidates: Sequence[Candidate]) -> int:
    """Index of the lowest metric_ce; ties to the lowest index (the pivot); NaN never wins (-1 if all NaN)."""
    ces = np.asarray([c.metric_ce for c in candidates], dtype=np.float64)
    if np.isnan(ces).all():
        return -1
    return int(np.argmin(np.where(np.isnan(ces), np.inf, ces)))  # argmin: first of equal minima


@FUSION_FUNCTIONS.register("mince", pretty_name="MinCE (per sequence)", reference_url=PAPER_URL)
def mince(
    candidates: Sequence[Candidate], *, temperature: float = 1.0, next_ids: np.ndarray | None = None
) -> FusedTarget:
    """FuseChat's MinCE: the whole sequence takes the teacher with the lowest metric_ce (ties: pivot)."""
    rows = len(candidates[0].ids)
    return _single(candidates, np.full(rows, sequence_choice(candidates), dtype=np.int64), temperature)


@FUSION_FUNCTIONS.register("mince_token", pretty_name="MinCE (per token)", reference_url=PAPER_URL)
def mince_token(
    candidates: Sequence[Candidate], *, temperature: float = 1.0, next_ids: np.ndarray | None = None
) -> FusedTarget:
    """Per row, the teacher that gives the gold next token the highest log-prob (ties: pivot).

    A teacher that does not list the gold token at a row has an unknown (large) CE there and loses; rows
    where no teacher lists it (or with no gold token) fall back to the per-sequence MinCE choice.
    """
    if next_ids is None:
        raise ValueError("mince_token needs next_ids (the gold next pivot token of every row)")
    next_ids = np.asarray(next_ids, dtype=np.int64)
    token_ce = np.full((len(next_ids), len(candidates)), np.inf)
    for index, cand in enumerate(candidates):
        hit = (cand.ids == next_ids[:, None]) & (cand.ids >= 0) & (next_ids[:, None] >= 0)
        lp = np.where(hit, cand.logprobs.astype(np.float64), -np.inf).max(axis=1)
        token_ce[:, index] = np.where(np.isnan(lp), np.inf, -lp)
    choice = np.argmin(token_ce, axis=1)
    unknown = ~np.isfinite(token_ce.min(axis=1))
    choice[unknown] = sequence_choice(candidates)
    return _single(candidates, choice, temperature)


@FUSION_FUNCTIONS.register("avgce", pretty_name="CE-weighted average", reference_url=FUSELLM_URL)
def avgce(
    candidates: Sequence[Candidate], *, temperature: float = 1.0, next_ids: np.ndarray | None = None
) -> FusedTarget:
    """Mix every teacher's q with weights exp(-metric_ce), i.e. proportional to 1 / perplexity.

    NaN CEs get weight 0; at a row where a teacher has no distribution the others are renormalised.
    The union of the listed ids is kept (duplicate ids summed), so the target is up to C*K wide.
    """
    ces = np.asarray([c.metric_ce for c in candidates], dtype=np.float64)
    finite = ~np.isnan(ces)
    if not finite.any():
        return _single(candidates, np.full(len(candidates[0].ids), -1), temperature)
    w = np.where(finite, np.exp(-(np.where(finite, ces, 0.0) - ces[finite].min())), 0.0)
    qs = [distribution(c.ids, c.logprobs, temperature) for c in candidates]
    has = np.stack([q.sum(axis=1) > 0 for q in qs], axis=1) & (w > 0)[None, :]  # [T, C]
    rw = np.where(has, w[None, :], 0.0)
    rw = rw / np.where(rw.sum(axis=1, keepdims=True) > 0, rw.sum(axis=1, keepdims=True), 1.0)
    ids = np.concatenate([np.where(c.ids >= 0, c.ids, -1).astype(np.int64) for c in candidates], axis=1)
    probs = np.concatenate([q * rw[:, [i]] for i, q in enumerate(qs)], axis=1).astype(np.float32)
    ids, probs = merge_duplicate_ids(np.where(probs > 0, ids, -1), probs)
    solo = has.sum(axis=1) == 1
    source = np.where(solo, np.argmax(has, axis=1), -1).astype(np.int16)
    return FusedTarget(ids, probs, source)


def merge_duplicate_ids(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, one slot per distinct id (probabilities summed), -1 slots dropped; width trimmed."""
    t, w = ids.shape
    if t == 0 or w == 0:
        return ids, probs
    key = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    sid = np.take_along_axis(key, order, axis=1)
    sp = np.take_along_axis(np.where(ids >= 0, probs, 0.0), order, axis=1)
    new = np.ones_like(sid, dtype=bool)
    new[:, 1:] = sid[:, 1:] != sid[:, :-1]
    group = np.cumsum(new, axis=1) - 1
    width = max(1, int(((sid != np.iinfo(np.int64).max) & new).sum(axis=1).max()))
    out_ids = np.full((t, w), -1, dtype=np.int64)
    out_p = np.zeros((t, w), dtype=np.float64)
    rows = np.repeat(np.arange(t), w).reshape(t, w)
    real = sid != np.iinfo(np.int64).max
    out_ids[rows[real], group[real]] = sid[real]
    np.add.at(out_p, (rows[real], group[real]), sp[real])
    return out_ids[:, :width], out_p[:, :width].astype(np.float32)
