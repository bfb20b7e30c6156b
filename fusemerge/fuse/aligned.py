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
one-to-many takes the matching piece, otherwise the one-hot of the next gold pivot token).

The aligned store is a `TopKStore` with the pivot store's shard plan, so sequence i has exactly as many
rows as the pivot's sequence i. Its identity is the source store's identity with `kind: aligned`,
`positions: pivot`, `vocab: pivot`, plus the pivot's model and tokenizer hash, the token alignment method,
the vocabulary mapping method and the sha256 of its table. Rows: `ids` int32 in the pivot vocabulary,
best first, -1 for an empty slot (fewer than K distinct pivot ids, or the last position, which has no next
token); `logprobs` float16, -inf in empty slots, not renormalised (dropped ids leave the sum below 1);
`metric_ce` and `ce_per_byte` = the source's own of the sequence (what MinCE compares, `fusion.metric`).

The vocabulary mapping is built before any shard: for `stats` that is a first pass over the whole corpus
counting co-aligned (pivot id, source id) pairs; its file records the dataset and alignment method it was
counted with. A file that does not match (other tokenizers, method or corpus) is refused, not rebuilt over.
Shards are the unit of resumption, as in the teacher pass; a complete aligned store is skipped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusemerge.checkpoint.layout import publish, tmp_sibling
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
from fusemerge.fuse.store import TopKStore
from fusemerge.fuse.teacher import tokenizer_hash
from fusemerge.lm.chat_data import ChatData
from fusemerge.lm.tokens import ChatTokenizer
from fusemerge.progress import progress_bar

LOG = logging.getLogger(__name__)
ALIGNED_FORMAT = 2  # 2: same-end rule for offsets. Bump when the transfer rules change: older aligned stores are then refused
ALIGNMENT_CACHE = 2**23  # aligned index pairs kept between the stats pass and the transfer (~70 MB)
COUNT_BLOCK = 512  # sequences aligned per batched call in the co-alignment count


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

    def __init__(self, role: str, tokenizer: Any, store: TopKStore, data_hash: str) -> None:
        self.role = role
        self.tokenizer = tokenizer
        self.store = store
        self.chat = ChatTokenizer(tokenizer)
        self.profile = TokenizerProfile.from_tokenizer(tokenizer)
        ident = store.identity
        if ident.get("kind", "teacher") != "teacher":
            raise FusemergeError(
                f"the {role} store is not a teacher store ({ident.get('kind')})", file=store.path
            )
        if ident.get("dataset_hash") != data_hash:
            raise FusemergeError(
                f"the {role} teacher store was made from other chat data than the recipe's; rerun the teach step",
                file=store.path,
            )
        if ident.get("tokenizer_hash") != tokenizer_hash(tokenizer):
            raise FusemergeError(
                f"the {role} teacher store was made with another tokenizer than "
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
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> AlignReport:
    """Fill (or finish) the aligned store of one source; a complete matching store is skipped.

    Args:
        source_tokenizer, pivot_tokenizer: the tokenizers the two teacher stores were made with.
        data: the chat data of the teach step (the same texts, checked by fingerprint).
        source_store, pivot_store: the complete teacher stores (`TopKStore` folders).
        aligned_dir: the aligned store folder (created, resumed or skipped).
        mapping_file: the vocabulary mapping file (built if missing, else loaded and checked).
        tokens: token alignment method (`alignment.tokens`: dtw | offsets).
        vocab: vocabulary mapping method (`alignment.vocab`: exact | mined | stats).
        progress: a tqdm bar over sequences with ETA.
        echo: where one-line status messages go.
    """
    import time

    begin = time.perf_counter()
    data_hash = data.fingerprint()
    pivot = _Side("pivot", pivot_tokenizer, TopKStore.open(pivot_store), data_hash)
    source = _Side("source", source_tokenizer, TopKStore.open(source_store), data_hash)
    n = len(data.sequences)
    for side in (pivot, source):
        if side.store.n_sequences != n:
            raise FusemergeError(
                f"the {side.role} teacher store holds {side.store.n_sequences} sequences, the data {n}",
                file=side.store.path,
            )
    name = Path(aligned_dir).name
    cache: dict[int, Alignment] = {}
    mapping = _vocab_mapping(
        Path(mapping_file), vocab, tokens, pivot, source, data, data_hash, cache, progress, echo
    )
    identity = aligned_identity(source.store.identity, pivot.store.identity, tokens, mapping)
    store = TopKStore.create_or_resume(
        aligned_dir, identity, n_sequences=n, shard_size=pivot.store.shard_size
    )
    pending = store.pending_shards()
    if not pending:
        store.finalize()
        echo(f"align {name}: store complete, skipped ({store.path})")
        return AlignReport(store, 0, 0, 0, time.perf_counter() - begin)
    echo(f"align {name}: {len(pending)} of {store.n_shards} shards to compute ({tokens}, {vocab})")
    total = sum(len(store.shard_sequences(j)) for j in pending)
    positions = from_teacher = 0
    with progress_bar(total, f"align {name}", enabled=progress) as bar:
        for shard in pending:
            ids, lps, ces, per_byte = [], [], [], []
            members = list(store.shard_sequences(shard))
            texts = {
                i: (source.tokenize(i, data.sequences[i]), pivot.tokenize(i, data.sequences[i]))
                for i in members
            }
            missing = [i for i in members if i not in cache]
            # One batched call per shard: per-call overhead, not the DP, dominates short chat turns.
            cache.update(zip(missing, align_batch(tokens, [texts[i] for i in missing]), strict=True))
            for i in members:
                s, p = texts[i]
                alignment = cache.pop(i)
                src = source.store.sequence(i)
                moved = transfer_topk(
                    alignment,
                    src.ids,
                    src.logprobs,
                    mapping,
                    p.ids,
                    pivot_pieces=pivot.pieces(p.ids),
                    source_pieces=source.pieces(s.ids),
                    **_span_ends(tokens, s, p),
                )
                ids.append(moved.ids.astype(np.int32))
                lps.append(moved.logprobs.astype(np.float16))
                ces.append(src.metric_ce)
                per_byte.append(src.ce_per_byte)
                positions += len(p.ids)
                from_teacher += int(moved.from_teacher.sum())
                bar.update(1)
            store.write_shard(shard, ids, lps, ces, ce_per_byte=per_byte)
    store.finalize()
    report = AlignReport(store, total, positions, from_teacher, time.perf_counter() - begin)
    echo(
        f"align {name}: {total} sequences, {positions} pivot positions, "
        f"{100 * report.teacher_fraction:.1f}% with a teacher distribution ({report.seconds:.1f} s)"
    )
    return report


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


def aligned_identity(
    source_identity: dict[str, Any], pivot_identity: dict[str, Any], tokens: str, mapping: VocabMapping
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
        "vocab_mapping": mapping.method,
        "vocab_mapping_sha256": hashlib.sha256(table.tobytes()).hexdigest(),
    }


# ---------------------------------------------------------------- the vocabulary mapping


def _vocab_mapping(
    path: Path,
    method: str,
    tokens: str,
    pivot: _Side,
    source: _Side,
    data: ChatData,
    data_hash: str,
    cache: dict[int, Alignment],
    progress: bool,
    echo: Callable[[str], None],
) -> VocabMapping:
    """Load the mapping file and check it was built for this pair (and corpus), or build and save it."""
    counted = method in ("stats", "prefix")  # built from the corpus: bound to it
    provenance = {"tokens": tokens, "dataset_hash": data_hash} if counted else {}
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
    params: dict[str, Any] = {}
    if method == "prefix" and tokens != "offsets":
        raise FusemergeError(
            "vocab 'prefix' needs character spans: use tokens: offsets", key="alignment.vocab"
        )
    if counted:
        counts = CoAlignmentCounts(len(source.profile), len(pivot.profile))
        kept = 0
        with progress_bar(len(data.sequences), "count co-alignments", enabled=progress) as bar:
            for start in range(0, len(data.sequences), COUNT_BLOCK):
                block = range(start, min(len(data.sequences), start + COUNT_BLOCK))
                pairs = [
                    (source.tokenize(i, data.sequences[i]), pivot.tokenize(i, data.sequences[i]))
                    for i in block
                ]
                for i, (s, p), alignment in zip(block, pairs, align_batch(tokens, pairs), strict=True):
                    if method == "prefix":
                        counts.add(s.ids, p.ids, same_start_alignment(s.offsets, p.offsets))
                    else:
                        counts.add(s.ids, p.ids, alignment)
                    if kept + len(alignment.indices) <= ALIGNMENT_CACHE:  # spare the transfer a second dtw
                        cache[i] = alignment
                        kept += len(alignment.indices)
                bar.update(len(block))
        params["counts"] = counts
    mapping = build_vocab_mapping(method, source.profile, pivot.profile, **params)
    tmp = tmp_sibling(path)
    mapping.save(tmp, provenance=provenance)
    publish(tmp, path)
    echo(f"vocab {path.name}: {method}, {100 * mapping.coverage:.1f}% of source ids mapped")
    return mapping


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})
