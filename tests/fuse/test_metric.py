"""fusion.metric: what MinCE and avgce compare per sequence, per byte (default) or per token (the paper)."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from fusemerge.fuse.collate import FusionCollator
from fusemerge.fuse.fusion import METRICS, PAPER_METRIC
from fusemerge.fuse.recipe import FusionSpec
from fusemerge.fuse.store import TopKStore


def _store(path, ids, ce_per_token: float, ce_per_byte: float) -> TopKStore:
    ids = np.asarray(ids, dtype=np.int32)
    lps = np.where(ids >= 0, -0.5, -np.inf).astype(np.float16)
    store = TopKStore.create_or_resume(path, {"top_k": ids.shape[1]}, n_sequences=1, shard_size=1)
    store.write_shard(0, [ids], [lps], [ce_per_token], ce_per_byte=[ce_per_byte])
    store.finalize()
    return TopKStore.open(path)


def test_per_byte_mince_picks_the_better_teacher_where_per_token_picks_the_finer_tokenizer(tmp_path):
    """A hand-made case: one answer of 60 UTF-8 bytes, which the pivot cuts into 20 tokens and the source
    into 40. The pivot's summed NLL is 24 nats (1.2 per token, 0.40 per byte); the source's 30 nats
    (0.75 per token, 0.50 per byte). The source models the text worse (more nats for the same bytes),
    yet wins per token because it has twice as many, easier, predictions."""
    pivot = _store(tmp_path / "pivot", [[1, 2], [3, 4], [5, -1]], 24 / 20, 24 / 60)
    source = _store(tmp_path / "source", [[7, 8], [9, -1], [6, -1]], 30 / 40, 30 / 60)
    tokens = np.array([10, 11, 12])
    for metric, winner in (("ce_per_token", "source"), ("ce_per_byte", "pivot")):
        collate = FusionCollator(pivot, {"source": source}, function="mince", metric=metric)
        ids, _ = collate.target(0, tokens)
        expected = (source if winner == "source" else pivot).sequence(0).ids
        assert ids.tolist() == np.asarray(expected).tolist(), metric
    # avgce weighs by exp(-metric): per byte the pivot gets the larger weight, per token the source
    for metric, heavier in (("ce_per_token", 7), ("ce_per_byte", 1)):
        ids, probs = FusionCollator(pivot, {"source": source}, function="avgce", metric=metric).target(
            0, tokens
        )
        row = dict(zip(ids[0].tolist(), probs[0].tolist(), strict=True))
        other = 1 if heavier == 7 else 7
        assert row[heavier] > row[other], metric


def test_the_recipe_offers_every_metric_with_per_byte_the_default():
    field = FusionSpec.model_fields["metric"]
    assert set(typing.get_args(field.annotation)) == set(METRICS)
    assert FusionSpec().metric == "ce_per_byte" and PAPER_METRIC in METRICS
    with pytest.raises(ValueError, match="unknown metric"):
        FusionCollator(None, {}, metric="ce_per_char", with_targets=False)
