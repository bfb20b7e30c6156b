"""Vocabulary mappings: every source id -> one pivot id (or -1), built once and saved as a file.

A source model's top-K lists source ids; the fused target is trained on pivot ids. Three ways to map:
- `exact`: the same text (FuseChat: the same string after swapping the markers; here the same canonical
  piece, which is that on ASCII and also matches byte-level BPE to SentencePiece on any script).
- `mined`: the pivot token at minimum edit distance (FuseLLM's MinED vocabulary mapping), exact first.
- `stats`: FuseChat 2.0's mapping statistics: among the pivot ids co-aligned with a source id over a
  corpus, the one with the smallest `ED'(s, p) * sigmoid(count)` (ED' is MinED's 0.1-weighted cost on
  marker-free strings); BOS/EOS map to BOS/EOS.
- `prefix` (needs `tokens: offsets`): the pivot id that most often *starts where the source token
  starts* over the corpus, i.e. the first pivot piece of the source token's text in context. A top-K
  entry is a prediction of what comes next; when the source predicts "(self" or ".\n", the pivot's next
  token is "(" or "." (what the pivot would emit first), not the most similar string ("self", "\n")
  that `stats` and `mined` choose. On code, where tokenizers cut whitespace and punctuation
  differently, that decides whether a teacher's knowledge reaches the student at all.
Special tokens map by role (bos, eos, unk, pad) or identical string, never by edit distance.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from fusemerge.checkpoint.layout import usual_file_mode
from fusemerge.errors import FusemergeError
from fusemerge.fuse.align.alignment import Alignment
from fusemerge.fuse.align.dtw import mined_cost
from fusemerge.fuse.align.profile import TokenizerProfile
from fusemerge.fuse.align.registry import VOCAB_MAPPINGS

LOG = logging.getLogger(__name__)
FORMAT = "fusemerge-vocab-mapping"


@dataclass(frozen=True)
class VocabMapping:
    """`source_to_pivot[s]` is the pivot id for source id s, or -1 where there is none."""

    source_to_pivot: np.ndarray  # int64 [source vocab]
    method: str
    source_fingerprint: str
    pivot_fingerprint: str
    pivot_size: int

    def __call__(self, source_ids: np.ndarray) -> np.ndarray:
        """Pivot ids of source ids; ids past the source vocabulary (padded logits) map to -1."""
        ids = np.asarray(source_ids, dtype=np.int64)
        table = self.source_to_pivot
        inside = (ids >= 0) & (ids < len(table))
        return np.where(inside, table[np.where(inside, ids, 0)], -1)

    @property
    def coverage(self) -> float:
        """Fraction of source ids that have a pivot id."""
        return float((self.source_to_pivot >= 0).mean()) if len(self.source_to_pivot) else 0.0

    def save(self, path: str | Path, *, provenance: dict[str, str] | None = None) -> Path:
        """Write the table; `provenance` (string pairs, e.g. the corpus a `stats` mapping was counted
        on) goes into the file's metadata next to the fingerprints, for the caller to check on reuse."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            **(provenance or {}),
            "format": FORMAT,
            "version": "1",
            "method": self.method,
            "source_fingerprint": self.source_fingerprint,
            "pivot_fingerprint": self.pivot_fingerprint,
            "pivot_size": str(self.pivot_size),
        }
        save_file({"source_to_pivot": self.source_to_pivot.astype(np.int32)}, str(path), metadata=meta)
        usual_file_mode(path)  # safetensors writes 0600
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        source: TokenizerProfile | None = None,
        pivot: TokenizerProfile | None = None,
    ) -> VocabMapping:
        """Load a saved mapping; with profiles given, refuse one built for other tokenizers."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FusemergeError("vocabulary mapping file not found", file=path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                table = f.get_tensor("source_to_pivot").astype(np.int64)
        except Exception as exc:
            raise FusemergeError(f"not a readable vocabulary mapping ({exc})", file=path) from exc
        if meta.get("format") != FORMAT:
            raise FusemergeError(f"not a vocabulary mapping (format {meta.get('format')!r})", file=path)
        for side, profile in (("source", source), ("pivot", pivot)):
            if profile is not None and meta.get(f"{side}_fingerprint") != profile.fingerprint:
                raise FusemergeError(
                    f"built for another {side} tokenizer than {profile.name or 'the one given'}: rebuild it",
                    file=path,
                    key=f"{side}_fingerprint",
                )
        return cls(
            table,
            meta["method"],
            meta["source_fingerprint"],
            meta["pivot_fingerprint"],
            int(meta["pivot_size"]),
        )


def _new(source: TokenizerProfile, pivot: TokenizerProfile, table: np.ndarray, method: str) -> VocabMapping:
    mapping = VocabMapping(table, method, source.fingerprint, pivot.fingerprint, len(pivot))
    LOG.info("vocabulary mapping %s: %.1f%% of source ids mapped", method, 100 * mapping.coverage)
    return mapping


def _specials(source: TokenizerProfile, pivot: TokenizerProfile, table: np.ndarray) -> None:
    """Special tokens: same role (bos, eos, unk, pad) first, else the same string, else nothing."""
    by_string = {pivot.tokens[i]: i for i in sorted(pivot.special, reverse=True)}
    for idx, role in source.special.items():
        target = pivot.role_id(role) if role != "special" else None
        if target is None:
            target = by_string.get(source.tokens[idx])
        table[idx] = -1 if target is None else target


def _exact_table(source: TokenizerProfile, pivot: TokenizerProfile) -> np.ndarray:
    first: dict[str, int] = {}
    for idx, piece in enumerate(pivot.pieces):
        if piece is not None:
            first.setdefault(piece, idx)
    table = np.fromiter(
        (-1 if p is None else first.get(p, -1) for p in source.pieces), dtype=np.int64, count=len(source)
    )
    _specials(source, pivot, table)
    return table


@VOCAB_MAPPINGS.register(
    "exact", pretty_name="exact token match", reference_url="https://arxiv.org/abs/2408.07990"
)
def exact(source: TokenizerProfile, pivot: TokenizerProfile) -> VocabMapping:
    """Map each source token to the pivot token with the same text (FuseChat), -1 where none has it."""
    return _new(source, pivot, _exact_table(source, pivot), "exact")


def nearest_by_edit_distance(
    queries: list[str], choices: list[str | None], *, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Index (lowest on ties) and Levenshtein distance of the nearest choice for every query.

    The choices are bucketed by length. The distance between strings is at least the difference of
    their lengths, so a query only meets the buckets within its best distance so far, nearest lengths
    first; each meeting is one rapidfuzz `cdist` over a block of same-length queries (vectorised C++).
    """
    best_d = np.full(len(queries), np.iinfo(np.int64).max, dtype=np.int64)
    best_i = np.full(len(queries), -1, dtype=np.int64)
    buckets: dict[int, list[int]] = defaultdict(list)
    for idx, c in enumerate(choices):
        if c is not None:
            buckets[len(c)].append(idx)
    if not buckets:
        return best_i, best_d
    bucket_strings = {length: [choices[i] for i in ids] for length, ids in buckets.items()}
    bucket_ids = {length: np.asarray(ids, dtype=np.int64) for length, ids in buckets.items()}
    longest = max(buckets)
    by_length: dict[int, list[int]] = defaultdict(list)
    for q, text in enumerate(queries):
        by_length[len(text)].append(q)
    for qlen, members in by_length.items():
        for start in range(0, len(members), chunk):
            block = np.asarray(members[start : start + chunk], dtype=np.int64)
            texts = [queries[q] for q in block]
            for delta in range(0, max(qlen, longest) + 1):
                open_ = best_d[block] >= delta  # only these can still improve or tie at this distance
                if not open_.any():
                    break
                for length in {qlen - delta, qlen + delta}:
                    if length not in buckets:
                        continue
                    rows = np.flatnonzero(open_)
                    dist = cdist(
                        [texts[r] for r in rows],
                        bucket_strings[length],
                        scorer=Levenshtein.distance,
                        dtype=np.int32,
                        workers=1,
                    )
                    arg = dist.argmin(axis=1)
                    d = dist[np.arange(len(rows)), arg].astype(np.int64)
                    cand = bucket_ids[length][arg]
                    target = block[rows]
                    better = (d < best_d[target]) | ((d == best_d[target]) & (cand < best_i[target]))
                    best_d[target[better]] = d[better]
                    best_i[target[better]] = cand[better]
    return best_i, best_d


@VOCAB_MAPPINGS.register(
    "mined", pretty_name="minimum edit distance", reference_url="https://arxiv.org/abs/2401.10491"
)
def mined(source: TokenizerProfile, pivot: TokenizerProfile) -> VocabMapping:
    """Map each source token to the same pivot token, else the nearest by edit distance (FuseLLM)."""
    table = _exact_table(source, pivot)
    missing = [i for i, p in enumerate(source.pieces) if p is not None and table[i] < 0]
    if missing:
        nearest, _ = nearest_by_edit_distance([source.pieces[i] for i in missing], list(pivot.pieces))
        table[np.asarray(missing, dtype=np.int64)] = nearest
    return _new(source, pivot, table, "mined")


class CoAlignmentCounts:
    """How often each (pivot id, source id) pair is aligned over a corpus (FuseChat 2.0's statistics).

    Pairs are kept as int64 keys in a buffer and folded into (key, count) with `np.unique` once the
    buffer is large, so memory follows the number of distinct pairs, not of tokens.
    """

    def __init__(self, source_size: int, pivot_size: int, *, flush_every: int = 4_000_000) -> None:
        self.source_size = source_size
        self.pivot_size = pivot_size
        self._keys = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.int64)
        self._buffer: list[tuple[np.ndarray, np.ndarray | None]] = []  # (keys, counts; None: ones)
        self._buffered = 0
        self._flush_every = flush_every

    def add(self, source_ids: np.ndarray, pivot_ids: np.ndarray, alignment: Alignment) -> None:
        """Count the pairs of one aligned sequence (every source position aligned to each pivot position)."""
        source_ids = np.asarray(source_ids, dtype=np.int64)
        pivot_ids = np.asarray(pivot_ids, dtype=np.int64)
        rows = np.repeat(pivot_ids, alignment.counts)
        keys = rows * self.source_size + source_ids[alignment.indices]
        self._buffer.append((keys, None))
        self._buffered += len(keys)
        if self._buffered >= self._flush_every:
            self._flush()

    def add_counts(self, pivot_ids: np.ndarray, source_ids: np.ndarray, counts: np.ndarray) -> None:
        """Add pairs counted elsewhere (another align worker's `pairs()`): counts of one pair add up, so
        the totals do not depend on how the corpus was split or in which order the parts arrive."""
        keys = np.asarray(pivot_ids, dtype=np.int64) * self.source_size + np.asarray(
            source_ids, dtype=np.int64
        )
        self._buffer.append((keys, np.asarray(counts, dtype=np.int64)))
        self._buffered += len(keys)
        if self._buffered >= self._flush_every:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        keys = np.concatenate([self._keys, *(k for k, _ in self._buffer)])
        weights = np.concatenate(
            [self._counts, *(np.ones(len(k), dtype=np.int64) if c is None else c for k, c in self._buffer)]
        )
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._counts = np.bincount(inverse, weights=weights).astype(np.int64)  # exact below 2**53
        self._buffer, self._buffered = [], 0

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pivot ids, source ids, counts) of every pair seen, sorted by pivot then source id."""
        self._flush()
        return self._keys // self.source_size, self._keys % self.source_size, self._counts.copy()


def _check_counts(
    counts: CoAlignmentCounts, source: TokenizerProfile, pivot: TokenizerProfile, what: str
) -> None:
    if (counts.source_size, counts.pivot_size) != (len(source), len(pivot)):
        raise FusemergeError(
            f"{what} counts are for vocabularies of {counts.source_size} and {counts.pivot_size} ids, "
            f"not {len(source)} and {len(pivot)}",
            key="alignment.vocab",
        )


def _fallback_table(source: TokenizerProfile, pivot: TokenizerProfile, fallback: str | None) -> np.ndarray:
    """The table a counted mapping starts from: ids the corpus never showed keep the fallback's pivot id."""
    if fallback is None:
        return np.full(len(source), -1, dtype=np.int64)
    return VOCAB_MAPPINGS.get(fallback, key="fallback").fn(source, pivot).source_to_pivot.copy()


def _strip_spaces(piece: str | None) -> str | None:
    return None if piece is None else piece.replace(" ", "")


@VOCAB_MAPPINGS.register(
    "stats", pretty_name="mapping statistics", reference_url="https://arxiv.org/abs/2408.07990"
)
def stats(
    source: TokenizerProfile,
    pivot: TokenizerProfile,
    *,
    counts: CoAlignmentCounts,
    fallback: str | None = "exact",
) -> VocabMapping:
    """FuseChat 2.0 mapping statistics: argmin ED' * sigmoid(count) over co-aligned pivot ids."""
    _check_counts(counts, source, pivot, "co-alignment")
    piv, src, cnt = counts.pairs()
    src_text = [_strip_spaces(p) for p in source.pieces]  # marker-free, as the reference compares
    piv_text = [_strip_spaces(p) for p in pivot.pieces]
    score = np.full(len(src), np.inf)
    for k, (p, s) in enumerate(zip(piv.tolist(), src.tolist(), strict=True)):
        a, b = src_text[s], piv_text[p]
        if a is not None and b is not None:
            score[k] = mined_cost(a, b)
    score = score / (1.0 + np.exp(-cnt.astype(np.float64)))  # * sigmoid(count)
    table = _fallback_table(source, pivot, fallback)
    order = np.lexsort((piv, score, src))  # per source id: lowest score, then lowest pivot id
    src_sorted, score_sorted = src[order], score[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = src_sorted[1:] != src_sorted[:-1]
    chosen = order[first & np.isfinite(score_sorted)]
    table[src[chosen]] = piv[chosen]
    _specials(source, pivot, table)
    return _new(source, pivot, table, "stats")


def same_start_alignment(source_offsets: np.ndarray, pivot_offsets: np.ndarray) -> Alignment:
    """Pivot position j -> the source positions whose token starts where token j starts (both with text).

    Pieces of one multibyte character share a span, so all of them pair with a pivot token starting there.
    """
    s_off = np.asarray(source_offsets, dtype=np.int64).reshape(-1, 2)
    p_off = np.asarray(pivot_offsets, dtype=np.int64).reshape(-1, 2)
    s_real = s_off[:, 1] > s_off[:, 0]
    s_index = np.flatnonzero(s_real)
    s_start = s_off[s_index, 0]
    order = np.argsort(s_start, kind="stable")
    s_index, s_start = s_index[order], s_start[order]
    p_real = p_off[:, 1] > p_off[:, 0]
    lo = np.searchsorted(s_start, p_off[:, 0], side="left")
    hi = np.searchsorted(s_start, p_off[:, 0], side="right")
    counts = np.where(p_real, hi - lo, 0)
    indptr = np.zeros(len(p_off) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    # entry e of pivot j's run is s_index[lo[j] + (e - indptr[j])]: one gather, no loop over tokens
    rank = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], counts)
    indices = s_index[np.repeat(lo, counts) + rank]
    return Alignment(indptr, indices.astype(np.int64), len(s_off))


@VOCAB_MAPPINGS.register("prefix", pretty_name="in-context first piece", reference_url=None)
def prefix(
    source: TokenizerProfile,
    pivot: TokenizerProfile,
    *,
    counts: CoAlignmentCounts,
    fallback: str | None = "exact",
) -> VocabMapping:
    """Per source id, the pivot id most often starting at the same character (ties: the lower id).

    `counts` come from `same_start_alignment` over the corpus; ids never seen there use `fallback`.
    """
    _check_counts(counts, source, pivot, "same-start")
    piv, src, cnt = counts.pairs()
    table = _fallback_table(source, pivot, fallback)
    order = np.lexsort((piv, -cnt, src))  # per source id: highest count, then lowest pivot id
    src_sorted = src[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = src_sorted[1:] != src_sorted[:-1]
    chosen = order[first]
    table[src[chosen]] = piv[chosen]
    _specials(source, pivot, table)
    return _new(source, pivot, table, "prefix")


def build_vocab_mapping(
    method: str, source: TokenizerProfile, pivot: TokenizerProfile, **params: object
) -> VocabMapping:
    """Build a registered vocabulary mapping by name (the recipe's `alignment.vocab`)."""
    return VOCAB_MAPPINGS.get(method, key="alignment.vocab").fn(source, pivot, **params)


class FirstPiece:
    """The pivot id a text starts with: the longest pivot piece that is a prefix of it (-1: none).

    The chain rule of `spans: chain` (`fusemerge.fuse.align.transfer`) needs the pivot token that the
    rest of a source candidate begins with ("'s" after "'" -> "s"); a text seen out of context has no
    tokenization of its own, and the longest matching piece is what a BPE vocabulary holds for it. Pieces
    are canonical (`TokenizerProfile.pieces`: bytes as latin-1 characters); where two ids share one piece
    (SentencePiece's '▁' and its byte piece '<0x20>') the first id wins unless it is a byte piece.
    """

    def __init__(self, pivot: TokenizerProfile) -> None:
        self._ids: dict[str, int] = {}
        for idx, piece in enumerate(pivot.pieces):
            if not piece:
                continue
            held = self._ids.get(piece)
            if held is None or (_is_byte_piece(pivot.tokens[held]) and not _is_byte_piece(pivot.tokens[idx])):
                self._ids[piece] = idx
        self._longest = max(map(len, self._ids), default=0)
        self._memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        found = self._memo.get(text)
        if found is None:
            found = next(
                (
                    self._ids[text[:n]]
                    for n in range(min(len(text), self._longest), 0, -1)
                    if text[:n] in self._ids
                ),
                -1,
            )
            self._memo[text] = found
        return found


def _is_byte_piece(token: str | None) -> bool:
    return token is not None and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
