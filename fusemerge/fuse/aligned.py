"""The align step: one source's top-K store moved into the pivot's token positions and vocabulary.

    fusemerge fuse recipe.yml --steps teach,align
    from fusemerge.fuse.aligned import run_align
    run_align(source_tok, pivot_tok, data, source_store=..., pivot_store=..., aligned_dir=..., mapping_file=...)

Folders under the recipe's work_dir (paths and names from `fusemerge.fuse.workdir.FuseWorkDir`):

    teacher/<pivot>/  teacher/<source>/        top-K stores of the teach step (inputs here)
    vocab/<source>-to-<pivot>.safetensors      source id -> pivot id (`VocabMapping`), built once, reused
    aligned/<source>/                          the aligned store (output here)

Per sequence, both tokenizers read the pivot-rendered text exactly as the teacher pass did
(`ChatTokenizer`, checked against the stores' tokenizer hash, dataset hash and row counts), the tokens are
aligned with `alignment.tokens` (dtw | offsets) and the source's top-K rows are moved onto pivot positions
and ids with `transfer_topk` (its rules, in `fusemerge.fuse.align.transfer`: one-to-one takes the row,
one-to-many takes the matching piece, otherwise the one-hot of the next gold pivot token; with
`alignment.spans: chain`, the default, also the chain-rule rules for spans the two tokenizers cut
differently).

The aligned store is a `TopKStore` with the pivot store's shard plan, so sequence i has exactly as many
rows as the pivot's sequence i. Its identity is the source store's identity with `kind: aligned`,
`positions: pivot`, `vocab: pivot`, plus the pivot's model and tokenizer hash, the token alignment method,
the vocabulary mapping method and the sha256 of its table, the span rules (`alignment_spans`) and the
transfer rules' version (`aligned_format`): a store of an older version is rebuilt, since no recipe can
ask for it; one made with other settings is refused (another recipe in the same work_dir). Rows: `ids` int32 in the pivot vocabulary,
best first, -1 for an empty slot (fewer than K distinct pivot ids, or the last position, which has no next
token); `logprobs` float16, -inf in empty slots, not renormalised (dropped ids leave the sum below 1);
`metric_ce` and `ce_per_byte` = the source's own of the sequence (what MinCE compares, `fusion.metric`).

The vocabulary mapping is built before any shard: for `stats` that is a first pass over the whole corpus
counting co-aligned (pivot id, source id) pairs; its file records the dataset and alignment method it was
counted with. A file that does not match (other tokenizers, method or corpus) is refused, not rebuilt over.
Shards are the unit of resumption, as in the teacher pass; a complete aligned store is skipped.

Workers (`alignment.workers`, default every core this process may use): the corpus is cut into chunks
of at most `CHUNK` sequences inside store shards; chunk c is counted and transferred by worker c mod W
(`fusemerge.fuse.align.workers.OwnedPool`), which keeps its own alignments from the count for the
transfer. The co-alignment counts of the chunks are summed in chunk order, and each shard is written by
this process from its chunks in sequence order, so every file is byte-identical to one worker's.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusemerge.checkpoint.layout import publish, remove_path, tmp_sibling
from fusemerge.errors import FusemergeError
from fusemerge.fuse.align import (
    Alignment,
    CoAlignmentCounts,
    TokenizedText,
    TokenizerProfile,
    VocabMapping,
    align_batch,
    build_vocab_mapping,
    same_start_alignment,
    transfer_topk,
)
from fusemerge.fuse.align.offsets import byte_spans
from fusemerge.fuse.align.transfer import SpanText
from fusemerge.fuse.align.vocab import FirstPiece
from fusemerge.fuse.align.workers import OwnedPool, default_workers
from fusemerge.fuse.store import MANIFEST, TopKStore
from fusemerge.fuse.teacher import tokenizer_hash
from fusemerge.lm.chat_data import ChatData
from fusemerge.lm.tokens import ChatTokenizer
from fusemerge.progress import progress_bar

LOG = logging.getLogger(__name__)
# 2: same-end rule for offsets; 3: `alignment_spans` (exact | chain). Bump when the transfer rules change:
# older aligned stores are then rebuilt
ALIGNED_FORMAT = 3
ALIGNMENT_CACHE = 2**23  # aligned index pairs kept between the stats pass and the transfer (~70 MB)
CHUNK = 256  # most sequences per worker task (and per batched dtw call); chunks never cross a store shard
TASKS_PER_WORKER = 8  # at least this many chunks per worker where the corpus allows: an even load
MIN_CHUNK = 16  # fewer sequences per task and the per-task overhead shows


@dataclass(frozen=True)
class AlignReport:
    """What one align run did: the store, and how much of the pivot text got a teacher distribution."""

    store: TopKStore
    sequences: int  # sequences transferred in this run (0 when the store was already complete)
    positions: int  # pivot positions transferred in this run
    from_teacher: int  # of those, positions that took a source distribution (the rest: next-gold one-hot)
    seconds: float

    @property
    def teacher_fraction(self) -> float:
        return self.from_teacher / max(1, self.positions)


class _Side:
    """One model's view of the data: its tokenizer, profile and teacher store, checked against each other."""

    def __init__(
        self, role: str, tokenizer: Any, store: TopKStore, profile: TokenizerProfile | None = None
    ) -> None:
        self.role = role
        self.tokenizer = tokenizer
        self.store = store
        self.chat = ChatTokenizer(tokenizer)
        self.profile = profile or TokenizerProfile.from_tokenizer(tokenizer)

    def check(self, data_hash: str) -> None:
        """Refuse a store made from other data or with another tokenizer (once, in the parent)."""
        store = self.store
        ident = store.identity
        if ident.get("kind", "teacher") != "teacher":
            raise FusemergeError(
                f"the {self.role} store is not a teacher store ({ident.get('kind')})", file=store.path
            )
        if ident.get("dataset_hash") != data_hash:
            raise FusemergeError(
                f"the {self.role} teacher store was made from other chat data than the recipe's; rerun the teach step",
                file=store.path,
            )
        if ident.get("tokenizer_hash") != tokenizer_hash(self.tokenizer):
            raise FusemergeError(
                f"the {self.role} teacher store was made with another tokenizer than "
                f"{self.profile.name}; rerun the teach step",
                file=store.path,
            )

    def tokenize(self, index: int, seq: Any) -> TokenizedText:
        """The ids the teacher pass used for this sequence, with strings, spans and piece weights."""
        ids, _, offsets = self.chat.with_offsets(seq)
        rows = len(self.store.sequence(index).ids)
        if len(ids) != rows:
            raise FusemergeError(
                f"sequence {index} has {len(ids)} {self.role} tokens but the teacher store has {rows} rows; "
                "rerun the teach step",
                file=self.store.path,
            )
        tokens = list(self.tokenizer.convert_ids_to_tokens(ids.tolist()))
        weights = self.profile.weights(ids)
        return TokenizedText(ids, tokens, offsets, self.profile.marker, weights, seq.text)

    def pieces(self, ids: np.ndarray) -> list[str | None]:
        table = self.profile.pieces
        return [table[i] if 0 <= i < len(table) else None for i in ids.tolist()]


def run_align(
    source_tokenizer: Any,
    pivot_tokenizer: Any,
    data: ChatData,
    *,
    source_store: str | Path,
    pivot_store: str | Path,
    aligned_dir: str | Path,
    mapping_file: str | Path,
    tokens: str = "dtw",
    vocab: str = "stats",
    workers: int | None = None,
    spans: str = "chain",
    progress: bool = True,
    echo: Callable[[str], None] = print,
    start_method: str | None = None,
) -> AlignReport:
    """Fill (or finish) the aligned store of one source; a complete matching store is skipped.

    Args:
        source_tokenizer, pivot_tokenizer: the tokenizers the two teacher stores were made with.
        data: the chat data of the teach step (the same texts, checked by fingerprint).
        source_store, pivot_store: the complete teacher stores (`TopKStore` folders).
        aligned_dir: the aligned store folder (created, resumed or skipped).
        mapping_file: the vocabulary mapping file (built if missing, else loaded and checked).
        tokens: token alignment method (`alignment.tokens`: dtw | offsets).
        vocab: vocabulary mapping method (`alignment.vocab`: exact | mined | stats | prefix).
        workers: worker processes (`alignment.workers`); None: every core this process may use.
        spans: span rules (`alignment.spans`: exact | chain, `fusemerge.fuse.align.transfer`).
        progress: a tqdm bar over sequences with ETA.
        echo: where one-line status messages go.
        start_method: multiprocessing start method of the workers (default: fork on Linux, else spawn).
    """
    import time

    begin = time.perf_counter()
    data_hash = data.fingerprint()
    pivot = _Side("pivot", pivot_tokenizer, TopKStore.open(pivot_store))
    source = _Side("source", source_tokenizer, TopKStore.open(source_store))
    pivot.check(data_hash)
    source.check(data_hash)
    n = len(data.sequences)
    for side in (pivot, source):
        if side.store.n_sequences != n:
            raise FusemergeError(
                f"the {side.role} teacher store holds {side.store.n_sequences} sequences, the data {n}",
                file=side.store.path,
            )
    name = Path(aligned_dir).name
    mapping_path = Path(mapping_file)
    mapping = _load_mapping(mapping_path, vocab, tokens, pivot, source, data_hash, echo)
    width = max(1, min(workers or default_workers(), n))
    chunks = _chunks(n, pivot.store.shard_size, _chunk_size(n, width))
    width = max(1, min(width, len(chunks)))
    pending: list[int] = []
    store: TopKStore | None = None
    if mapping is not None:
        store = _aligned_store(aligned_dir, source, pivot, tokens, mapping, n, spans, echo)
        pending = store.pending_shards()
        if not pending:
            store.finalize()
            echo(f"align {name}: store complete, skipped ({store.path})")
            return AlignReport(store, 0, 0, 0, time.perf_counter() - begin)
    job = _Job(tokens, spans, _SideSpec.of(source), _SideSpec.of(pivot), ALIGNMENT_CACHE // width)
    if width > 1 and n:
        # load the compiled aligner (numba's cache: ~0.2 CPU-s) here, once, for forked workers to inherit
        align_batch(tokens, [(source.tokenize(0, data.sequences[0]), pivot.tokenize(0, data.sequences[0]))])
    with OwnedPool(width, _WorkerState, (job,), start_method=start_method) as pool:
        if mapping is None:
            mapping = _count_and_build(
                pool, chunks, mapping_path, vocab, tokens, data, data_hash, source, pivot, progress, echo
            )
            store = _aligned_store(aligned_dir, source, pivot, tokens, mapping, n, spans, echo)
            pending = store.pending_shards()
        assert store is not None
        if not pending:
            store.finalize()
            echo(f"align {name}: store complete, skipped ({store.path})")
            return AlignReport(store, 0, 0, 0, time.perf_counter() - begin)
        echo(
            f"align {name}: {len(pending)} of {store.n_shards} shards to compute ({tokens}, {vocab}, {spans}"
            + (f", {width} workers)" if width > 1 else ")")
        )
        total, positions, from_teacher = _transfer(
            pool, chunks, pending, store, mapping, data, name, progress
        )
    store.finalize()
    report = AlignReport(store, total, positions, from_teacher, time.perf_counter() - begin)
    echo(
        f"align {name}: {total} sequences, {positions} pivot positions, "
        f"{100 * report.teacher_fraction:.1f}% with a teacher distribution ({report.seconds:.1f} s)"
    )
    return report


def _aligned_store(
    folder: str | Path,
    source: _Side,
    pivot: _Side,
    tokens: str,
    mapping: VocabMapping,
    n: int,
    spans: str,
    echo: Callable[[str], None],
) -> TopKStore:
    identity = aligned_identity(source.store.identity, pivot.store.identity, tokens, mapping, spans)
    _drop_older_format(Path(folder), echo)
    return TopKStore.create_or_resume(folder, identity, n_sequences=n, shard_size=pivot.store.shard_size)


def _chunk_size(n: int, workers: int) -> int:
    """Sequences per task: CHUNK, or smaller so that every worker gets TASKS_PER_WORKER of them."""
    if workers == 1:
        return CHUNK
    return max(MIN_CHUNK, min(CHUNK, -(-n // (workers * TASKS_PER_WORKER))))


def _chunks(n: int, shard_size: int, size: int) -> list[tuple[int, range]]:
    """(shard, sequences) of every chunk, in corpus order: at most `size` sequences, inside one shard."""
    out = []
    for shard, first in enumerate(range(0, n, shard_size)):
        last = min(n, first + shard_size)
        out += [(shard, range(a, min(last, a + size))) for a in range(first, last, size)]
    return out


def _transfer(
    pool: OwnedPool,
    chunks: list[tuple[int, range]],
    pending: list[int],
    store: TopKStore,
    mapping: VocabMapping,
    data: ChatData,
    name: str,
    progress: bool,
) -> tuple[int, int, int]:
    """Every pending shard's chunks through the workers; each shard written once all of its chunks are in.

    Returns (sequences, pivot positions, positions with a teacher distribution)."""
    todo = set(pending)
    mine = [c for c, (shard, _) in enumerate(chunks) if shard in todo]
    left = {shard: sum(1 for c in mine if chunks[c][0] == shard) for shard in pending}
    done: dict[int, tuple] = {}
    total = sum(len(chunks[c][1]) for c in mine)
    positions = from_teacher = 0
    width = pool.workers
    list(pool.run(_use_mapping, [mapping] * width, owners=list(range(width))))
    payloads = [(list(chunks[c][1]), [data.sequences[i] for i in chunks[c][1]]) for c in mine]
    with progress_bar(total, f"align {name}", enabled=progress) as bar:
        for k, result in pool.run(_transfer_chunk, payloads, owners=[c % width for c in mine]):
            c = mine[k]
            shard = chunks[c][0]
            done[c] = result
            positions += result[4]
            from_teacher += result[5]
            bar.update(len(chunks[c][1]))
            left[shard] -= 1
            if left[shard] == 0:
                parts = [done.pop(j) for j in mine if chunks[j][0] == shard]  # sequence order
                store.write_shard(
                    shard,
                    [a for part in parts for a in part[0]],
                    [a for part in parts for a in part[1]],
                    [ce for part in parts for ce in part[2]],
                    ce_per_byte=[ce for part in parts for ce in part[3]],
                )
    return total, positions, from_teacher


# ---------------------------------------------------------------- what runs in the workers


@dataclass(frozen=True)
class _SideSpec:
    """One side as a worker rebuilds it: picklable (the store travels as its path, not its arrays)."""

    role: str
    tokenizer: Any
    profile: TokenizerProfile
    store: Path

    @classmethod
    def of(cls, side: _Side) -> _SideSpec:
        return cls(side.role, side.tokenizer, side.profile, side.store.path)

    def side(self) -> _Side:
        return _Side(self.role, self.tokenizer, TopKStore.open(self.store), self.profile)


@dataclass(frozen=True)
class _Job:
    tokens: str
    spans: str
    source: _SideSpec
    pivot: _SideSpec
    cache_budget: int  # aligned index pairs this worker keeps from the count for the transfer


class _WorkerState:
    """A worker's sides, its alignment cache and (for the transfer) the vocabulary mapping."""

    def __init__(self, job: _Job) -> None:
        self.tokens = job.tokens
        self.source = job.source.side()
        self.pivot = job.pivot.side()
        self.spans = job.spans
        chain_offsets = job.spans == "chain" and job.tokens == "offsets"
        self.first_piece = FirstPiece(self.pivot.profile) if chain_offsets else None
        self.budget = job.cache_budget
        self.kept = 0
        self.cache: dict[int, Alignment] = {}
        self.mapping: VocabMapping | None = None

    def texts(self, indices: list[int], seqs: list[Any]) -> list[tuple[TokenizedText, TokenizedText]]:
        return [
            (self.source.tokenize(i, seq), self.pivot.tokenize(i, seq))
            for i, seq in zip(indices, seqs, strict=True)
        ]


def _count_chunk(state: _WorkerState, payload: tuple[str, list[int], list[Any]]) -> tuple[np.ndarray, ...]:
    """The co-aligned (pivot id, source id) pairs of one chunk, counted: (pivot ids, source ids, counts)."""
    method, indices, seqs = payload
    counts = CoAlignmentCounts(len(state.source.profile), len(state.pivot.profile))
    pairs = state.texts(indices, seqs)
    for i, (s, p), alignment in zip(indices, pairs, align_batch(state.tokens, pairs), strict=True):
        if method == "prefix":
            counts.add(s.ids, p.ids, same_start_alignment(s.offsets, p.offsets))
        else:
            counts.add(s.ids, p.ids, alignment)
        if state.kept + len(alignment.indices) <= state.budget:  # spare the transfer a second dtw
            state.cache[i] = alignment
            state.kept += len(alignment.indices)
    return counts.pairs()


def _use_mapping(state: _WorkerState, mapping: VocabMapping) -> None:
    state.mapping = mapping


def _transfer_chunk(state: _WorkerState, payload: tuple[list[int], list[Any]]) -> tuple:
    """One chunk moved onto the pivot: (ids, logprobs, metric_ce and ce_per_byte per sequence, positions,
    positions with a teacher distribution)."""
    indices, seqs = payload
    assert state.mapping is not None
    texts = dict(zip(indices, state.texts(indices, seqs), strict=True))
    missing = [i for i in indices if i not in state.cache]
    # One batched call per chunk: per-call overhead, not the DP, dominates short chat turns.
    state.cache.update(zip(missing, align_batch(state.tokens, [texts[i] for i in missing]), strict=True))
    ids, lps, ces, per_byte = [], [], [], []
    positions = from_teacher = 0
    for i in indices:
        s, p = texts[i]
        alignment = state.cache.pop(i)
        moved, ce, ce_byte = _transfer_one(state, i, alignment, s, p)
        ids.append(moved.ids.astype(np.int32))
        lps.append(moved.logprobs.astype(np.float16))
        ces.append(ce)
        per_byte.append(ce_byte)
        positions += len(p.ids)
        from_teacher += int(moved.from_teacher.sum())
    return ids, lps, ces, per_byte, positions, from_teacher


def _transfer_one(
    state: _WorkerState, i: int, alignment: Alignment, s: TokenizedText, p: TokenizedText
) -> tuple[Any, float, float]:
    """Sequence i's source rows moved onto its pivot positions, and the source's metric_ce and ce_per_byte."""
    src = state.source.store.sequence(i)
    moved = transfer_topk(
        alignment,
        src.ids,
        src.logprobs,
        state.mapping,
        p.ids,
        pivot_pieces=state.pivot.pieces(p.ids),
        source_pieces=state.source.pieces(s.ids),
        **_span_ends(state.tokens, s, p),
        spans=state.spans,
        span_text=_span_text(s, p, state.source.profile, state.first_piece),
    )
    return moved, src.metric_ce, src.ce_per_byte


def _span_ends(tokens: str, source: TokenizedText, pivot: TokenizedText) -> dict[str, np.ndarray]:
    """Where each token ends, for the same-end rule of `offsets` alignment (none for `dtw`).

    Zero-width tokens (BOS, EOS) end where the text before them ends, so BOS still matches BOS.
    """
    if tokens != "offsets" or source.offsets is None or pivot.offsets is None:
        return {}
    return {"source_ends": _ends(source.offsets), "pivot_ends": _ends(pivot.offsets)}


def _ends(offsets: np.ndarray) -> np.ndarray:
    ends = np.asarray(offsets, dtype=np.int64)[:, 1]
    return np.maximum.accumulate(ends) if len(ends) else ends


def _span_text(
    source: TokenizedText, pivot: TokenizedText, profile: TokenizerProfile, first_piece: FirstPiece | None
) -> SpanText | None:
    """Byte spans of both sides for the span rules of `spans: chain` (offsets only; None elsewhere)."""
    if first_piece is None or pivot.text is None:
        return None
    s, p = byte_spans(source), byte_spans(pivot)
    if s is None or p is None:
        return None
    text = pivot.text.encode("utf-8", "surrogatepass").decode("latin-1")
    return SpanText(text, source.ids, s[0], s[1], p[0], p[1], profile.pieces, first_piece)


def _drop_older_format(folder: Path, echo: Callable[[str], None]) -> None:
    """Remove an aligned store made under older transfer rules (`aligned_format`): derived data that no
    recipe can ask for any more, so it is rebuilt rather than refused."""
    import json

    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        identity = json.loads(manifest.read_text(encoding="utf-8")).get("identity", {})
    except (OSError, ValueError):
        return  # not readable: TopKStore refuses it with its own message
    if identity.get("kind") == "aligned" and identity.get("aligned_format", 0) < ALIGNED_FORMAT:
        echo(
            f"align {folder.name}: store made by older transfer rules (format "
            f"{identity.get('aligned_format', 1)}), rebuilt"
        )
        remove_path(folder)


def _ends(offsets: np.ndarray) -> np.ndarray:
    ends = np.asarray(offsets, dtype=np.int64)[:, 1]
    return np.maximum.accumulate(ends) if len(ends) else ends


def aligned_identity(
    source_identity: dict[str, Any],
    pivot_identity: dict[str, Any],
    tokens: str,
    mapping: VocabMapping,
    spans: str = "chain",
) -> dict[str, Any]:
    """The source store's identity, re-labelled as pivot positions and vocabulary, plus what moved it."""
    table = np.ascontiguousarray(mapping.source_to_pivot, dtype=np.int64)
    return {
        **source_identity,
        "kind": "aligned",
        "positions": "pivot",
        "vocab": "pivot",
        "aligned_format": ALIGNED_FORMAT,
        "pivot_model": pivot_identity["model"],
        "pivot_model_fingerprint": pivot_identity.get("model_fingerprint"),
        "pivot_tokenizer_hash": pivot_identity["tokenizer_hash"],
        "pivot_vocab_size": mapping.pivot_size,
        "alignment_tokens": tokens,
        "alignment_spans": spans,
        "vocab_mapping": mapping.method,
        "vocab_mapping_sha256": hashlib.sha256(table.tobytes()).hexdigest(),
    }


# ---------------------------------------------------------------- the vocabulary mapping


def _provenance(method: str, tokens: str, data_hash: str) -> dict[str, str]:
    counted = method in ("stats", "prefix")  # built from the corpus: bound to it
    return {"tokens": tokens, "dataset_hash": data_hash} if counted else {}


def _load_mapping(
    path: Path,
    method: str,
    tokens: str,
    pivot: _Side,
    source: _Side,
    data_hash: str,
    echo: Callable[[str], None],
) -> VocabMapping | None:
    """The mapping file, checked to be built for this pair (and corpus); a method that needs no corpus
    is built and saved here; None when a counted one must first be counted (`_count_and_build`)."""
    provenance = _provenance(method, tokens, data_hash)
    if path.is_file():
        mapping = VocabMapping.load(path, source=source.profile, pivot=pivot.profile)
        if mapping.method != method:
            raise FusemergeError(
                f"built with vocab '{mapping.method}', the recipe asks for '{method}', perhaps by another "
                "recipe: give this recipe its own work_dir",
                file=path,
                key="alignment.vocab",
            )
        meta = _metadata(path)
        for key, want in provenance.items():
            if meta.get(key) != want:
                what = "other chat data" if key == "dataset_hash" else f"tokens '{meta.get(key)}'"
                raise FusemergeError(
                    f"this {method} mapping was counted on {what}, perhaps by another recipe: give this recipe "
                    "its own work_dir",
                    file=path,
                    key=key,
                )
        return mapping
    if method == "prefix" and tokens != "offsets":
        raise FusemergeError(
            "vocab 'prefix' needs character spans: use tokens: offsets", key="alignment.vocab"
        )
    if provenance:
        return None
    mapping = _save_mapping(path, build_vocab_mapping(method, source.profile, pivot.profile), provenance)
    echo(f"vocab {path.name}: {method}, {100 * mapping.coverage:.1f}% of source ids mapped")
    return mapping


def _count_and_build(
    pool: OwnedPool,
    chunks: list[tuple[int, range]],
    path: Path,
    method: str,
    tokens: str,
    data: ChatData,
    data_hash: str,
    source: _Side,
    pivot: _Side,
    progress: bool,
    echo: Callable[[str], None],
) -> VocabMapping:
    """A counted mapping (`stats`, `prefix`): co-alignments counted per chunk by the workers, summed here
    in chunk order (integer sums: the totals do not depend on the split), then built and saved."""
    counts = CoAlignmentCounts(len(source.profile), len(pivot.profile))
    payloads = [(method, list(seqs), [data.sequences[i] for i in seqs]) for _, seqs in chunks]
    ready: dict[int, tuple[np.ndarray, ...]] = {}
    following = 0
    with progress_bar(len(data.sequences), "count co-alignments", enabled=progress) as bar:
        for c, pairs in pool.run(
            _count_chunk, payloads, owners=[c % pool.workers for c in range(len(chunks))]
        ):
            ready[c] = pairs
            bar.update(len(chunks[c][1]))
            while following in ready:
                counts.add_counts(*ready.pop(following))
                following += 1
    mapping = build_vocab_mapping(method, source.profile, pivot.profile, counts=counts)
    mapping = _save_mapping(path, mapping, _provenance(method, tokens, data_hash))
    echo(f"vocab {path.name}: {method}, {100 * mapping.coverage:.1f}% of source ids mapped")
    return mapping


def _save_mapping(path: Path, mapping: VocabMapping, provenance: dict[str, str]) -> VocabMapping:
    tmp = tmp_sibling(path)
    mapping.save(tmp, provenance=provenance)
    publish(tmp, path)
    return mapping


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})
