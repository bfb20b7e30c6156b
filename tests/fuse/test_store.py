"""The top-K store: layout, memory-mapped reads, atomic shards, refusal of a store made for another run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusemerge.errors import FusemergeError
from fusemerge.fuse.store import TopKStore, store_bytes_per_token

IDENTITY = {"kind": "teacher", "model": "m", "tokenizer_hash": "t1", "dataset_hash": "d1", "top_k": 4}


def _rows(rng, lengths, k=4):
    ids = [rng.integers(0, 50000, size=(n, k)).astype(np.int32) for n in lengths]
    lps = [np.sort(rng.normal(-3, 1, size=(n, k)), axis=1)[:, ::-1].astype(np.float16) for n in lengths]
    return ids, lps


def test_roundtrip_sharded_and_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [5, 1, 9, 3, 7]
    store = TopKStore.create_or_resume(tmp_path / "s", IDENTITY, n_sequences=5, shard_size=2)
    assert store.n_shards == 3 and store.pending_shards() == [0, 1, 2]
    ids, lps = _rows(rng, lengths)
    ces = [1.5, 2.5, 3.5, 4.5, 5.5]
    for j in (2, 0, 1):  # any order: a shard's sequences are fixed by the plan
        seqs = store.shard_sequences(j)
        store.write_shard(
            j,
            ids[seqs.start : seqs.stop],
            lps[seqs.start : seqs.stop],
            ces[seqs.start : seqs.stop],
            ce_per_byte=[c / 4 for c in ces[seqs.start : seqs.stop]],
        )
    assert store.finalize()
    opened = TopKStore.open(tmp_path / "s", identity=IDENTITY)
    for i in range(5):
        seq = opened.sequence(i)
        assert isinstance(seq.ids.base, np.memmap) or isinstance(seq.ids, np.memmap)
        np.testing.assert_array_equal(seq.ids, ids[i])
        np.testing.assert_array_equal(seq.logprobs, lps[i])
        assert seq.metric_ce == ces[i] == seq.metric("ce_per_token")
        assert seq.ce_per_byte == ces[i] / 4 == seq.metric("ce_per_byte")
    np.testing.assert_array_equal(opened.metric_ce(), np.asarray(ces, dtype=np.float32))
    np.testing.assert_array_equal(opened.metric("ce_per_byte"), np.asarray(ces, dtype=np.float32) / 4)
    assert opened.n_tokens() == sum(lengths)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and [s["tokens"] for s in manifest["shards"]] == [6, 12, 7]


def test_bytes_per_token_is_at_most_64_at_k10(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 400, size=64).tolist()  # chat-sized sequences
    ident = {**IDENTITY, "top_k": 10}
    store = TopKStore.create_or_resume(tmp_path / "s", ident, n_sequences=64, shard_size=16)
    ids, lps = _rows(rng, lengths, k=10)
    for j in range(store.n_shards):
        r = store.shard_sequences(j)
        store.write_shard(
            j, ids[r.start : r.stop], lps[r.start : r.stop], [1.0] * len(r), ce_per_byte=[0.3] * len(r)
        )
        assert store_bytes_per_token(tmp_path / "s") <= 64  # also while unfinished
    store.finalize()
    bpt = store.bytes_per_token()
    assert 60 <= bpt <= 64, bpt


def test_a_store_for_another_run_is_refused_naming_the_difference(tmp_path):
    TopKStore.create_or_resume(tmp_path / "s", IDENTITY, n_sequences=3, shard_size=2)
    with pytest.raises(FusemergeError, match=r"identity\.dataset_hash: store has \"d1\", now \"d2\""):
        TopKStore.create_or_resume(
            tmp_path / "s", {**IDENTITY, "dataset_hash": "d2"}, n_sequences=3, shard_size=2
        )
    with pytest.raises(FusemergeError, match=r"identity\.top_k: store has 4, now 10"):
        TopKStore.create_or_resume(tmp_path / "s", {**IDENTITY, "top_k": 10}, n_sequences=3, shard_size=2)
    with pytest.raises(FusemergeError, match=r"n_sequences: store has 3, now 4"):
        TopKStore.create_or_resume(tmp_path / "s", IDENTITY, n_sequences=4, shard_size=2)
    with pytest.raises(FusemergeError, match="tokenizer_hash"):
        TopKStore.open(tmp_path / "s", identity={**IDENTITY, "tokenizer_hash": "t2"})


def test_unfinished_and_foreign_folders_are_refused(tmp_path):
    TopKStore.create_or_resume(tmp_path / "s", IDENTITY, n_sequences=3, shard_size=2)
    with pytest.raises(FusemergeError, match="unfinished"):
        TopKStore.open(tmp_path / "s")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FusemergeError, match="not empty and has no manifest.json"):
        TopKStore.create_or_resume(tmp_path / "other", IDENTITY, n_sequences=3, shard_size=2)


def test_partial_shards_never_count_and_are_cleared_on_resume(tmp_path):
    rng = np.random.default_rng(2)
    store = TopKStore.create_or_resume(tmp_path / "s", IDENTITY, n_sequences=4, shard_size=2)
    ids, lps = _rows(rng, [3, 4])
    store.write_shard(0, ids, lps, [1.0, 2.0], ce_per_byte=[0.3, 0.6])
    stale = tmp_path / "s" / "shard-00001.safetensors.tmp-999"
    stale.write_bytes(b"half a shard")
    assert store.pending_shards() == [1] and not store.finalize()
    resumed = TopKStore.create_or_resume(tmp_path / "s", IDENTITY, n_sequences=4, shard_size=2)
    assert not stale.exists() and resumed.pending_shards() == [1]
    with pytest.raises(ValueError, match="needs 2 sequences"):
        resumed.write_shard(1, ids[:1], lps[:1], [1.0], ce_per_byte=[0.3])


def test_a_store_of_the_previous_format_is_refused_with_the_command_to_rebuild_it(tmp_path):
    """A format-1 store has no ce_per_byte: reusing it would leave fusion.metric nothing to compare."""
    store = TopKStore.create_or_resume(tmp_path / "s", IDENTITY, n_sequences=2, shard_size=2)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "format": "fusemerge-topk/1"}))
    for attempt in (
        lambda: TopKStore.open(store.path),
        lambda: TopKStore.create_or_resume(store.path, IDENTITY, n_sequences=2, shard_size=2),
    ):
        with pytest.raises(FusemergeError) as info:
            attempt()
        message = info.value.one_line()
        assert "older format (fusemerge-topk/1, now fusemerge-topk/2" in message
        assert "fusemerge fuse RECIPE --steps teach,align" in message and str(store.path) in message
        assert "\n" not in message
