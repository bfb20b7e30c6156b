"""Fusion functions: MinCE choice (ties, NaN), per-token MinCE, CE-weighted averages, q = softmax(z / T)."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest

from fusemerge.errors import FusemergeError
from fusemerge.fuse.fusion import (
    FUSION_FUNCTIONS,
    Candidate,
    distribution,
    fuse,
    merge_duplicate_ids,
    sequence_choice,
)
from fusemerge.fuse.recipe import FusionSpec


def cand(name: str, ids, logprobs, ce: float) -> Candidate:
    return Candidate(name, np.asarray(ids, dtype=np.int32), np.asarray(logprobs, dtype=np.float16), ce)


PIVOT = cand("pivot", [[1, 2, 3], [4, 5, -1]], [[-0.5, -1.5, -2.5], [-0.1, -3.0, 0.0]], 1.0)
SOURCE = cand("source", [[7, 8, -1], [9, -1, -1]], [[-0.2, -2.0, -np.inf], [-0.3, -np.inf, -np.inf]], 0.5)


def test_distribution_is_softmax_over_listed_ids_with_temperature():
    ids = np.array([[3, 1, -1], [-1, -1, -1]])
    lp = np.array([[-0.5, -1.0, 5.0], [0.0, 0.0, 0.0]])
    for t in (1.0, 2.0):
        q = distribution(ids, lp, t)
        e = np.exp(np.array([-0.5, -1.0]) / t)
        np.testing.assert_allclose(q[0], [*(e / e.sum()), 0.0], rtol=1e-6)
        assert q[1].tolist() == [0.0, 0.0, 0.0]  # no listed id: no distribution


def test_mince_takes_the_lowest_ce_teacher_for_the_whole_sequence():
    target = fuse("mince", [PIVOT, SOURCE])
    assert target.ids.tolist() == [[7, 8, -1], [9, -1, -1]]
    np.testing.assert_allclose(target.probs[1], [1.0, 0.0, 0.0])
    assert target.source.tolist() == [1, 1]
    worse = cand("source", SOURCE.ids, SOURCE.logprobs, 2.0)
    assert fuse("mince", [PIVOT, worse]).ids.tolist() == [[1, 2, 3], [4, 5, -1]]


def test_mince_ties_go_to_the_pivot():
    tie = cand("source", SOURCE.ids, SOURCE.logprobs, 1.0)
    assert sequence_choice([PIVOT, tie]) == 0
    assert fuse("mince", [PIVOT, tie]).source.tolist() == [0, 0]
    # among sources, the first of equal minima wins
    assert sequence_choice([cand("p", PIVOT.ids, PIVOT.logprobs, 3.0), tie, tie]) == 1


def test_mince_nan_never_wins():
    nan_pivot = cand("pivot", PIVOT.ids, PIVOT.logprobs, math.nan)
    assert sequence_choice([nan_pivot, cand("s", SOURCE.ids, SOURCE.logprobs, 99.0)]) == 1
    nan_source = cand("s", SOURCE.ids, SOURCE.logprobs, math.nan)
    assert sequence_choice([PIVOT, nan_source]) == 0
    assert sequence_choice([cand("p", PIVOT.ids, PIVOT.logprobs, 7.0), nan_source]) == 0
    everything_nan = fuse("mince", [nan_pivot, nan_source])
    assert (everything_nan.probs == 0).all() and (everything_nan.ids == -1).all()
    assert everything_nan.source.tolist() == [-1, -1]


def test_mince_token_picks_per_row_the_teacher_best_on_the_gold_token():
    pivot = cand("pivot", [[1, 2], [4, 5], [6, -1]], [[-0.2, -2.0], [-3.0, -0.1], [-0.5, 0]], 0.1)
    source = cand("source", [[2, 1], [4, -1], [8, -1]], [[-0.1, -2.0], [-0.5, 0], [-0.1, 0]], 5.0)
    target = fuse("mince_token", [pivot, source], next_ids=np.array([1, 4, 9]))
    # row 0: gold 1 -> pivot -0.2 beats source -2.0; row 1: gold 4 -> source -0.5 beats pivot -3.0;
    # row 2: nobody lists gold 9 -> per-sequence MinCE (pivot, lower metric_ce)
    assert target.source.tolist() == [0, 1, 0]
    assert target.ids[1].tolist() == [4, -1]
    tie = cand("source", [[1, 2]], [[-0.2, -2.0]], 0.0)
    assert (
        fuse("mince_token", [cand("p", [[1, 2]], [[-0.2, -2.0]], 1.0), tie], next_ids=np.array([1])).source[0]
        == 0
    )
    with pytest.raises(ValueError, match="next_ids"):
        fuse("mince_token", [pivot, source])


def test_avgce_weights_are_exp_minus_ce_and_duplicate_ids_are_summed():
    pivot = cand("pivot", [[1, 2]], [[0.0, 0.0]], 1.0)  # q = 0.5, 0.5
    source = cand("source", [[2, 3]], [[math.log(0.25), math.log(0.75)]], 2.0)
    target = fuse("avgce", [pivot, source])
    w = np.exp([-1.0, -2.0])
    w /= w.sum()
    qs = np.exp(source.logprobs[0].astype(np.float64))  # 0.25, 0.75 as float16 stores them
    qs /= qs.sum()
    expect = {1: 0.5 * w[0], 2: 0.5 * w[0] + qs[0] * w[1], 3: qs[1] * w[1]}
    got = {int(i): float(p) for i, p in zip(target.ids[0], target.probs[0], strict=True) if i >= 0}
    assert got.keys() == expect.keys()
    for key, value in expect.items():
        assert got[key] == pytest.approx(value, rel=1e-5)
    assert target.probs.sum() == pytest.approx(1.0, rel=1e-6)
    assert target.source.tolist() == [-1]


def test_avgce_renormalises_where_a_teacher_has_nothing_and_ignores_nan():
    pivot = cand("pivot", [[1, 2], [3, -1]], [[0.0, 0.0], [0.0, 0.0]], 1.0)
    source = cand("source", [[5, -1], [-1, -1]], [[0.0, 0.0], [0.0, 0.0]], 0.2)
    target = fuse("avgce", [pivot, source])
    assert target.probs[1].sum() == pytest.approx(1.0) and target.source[1] == 0
    assert target.ids[1][target.probs[1] > 0].tolist() == [3]
    nan_source = cand("source", source.ids, source.logprobs, math.nan)
    only_pivot = fuse("avgce", [pivot, nan_source])
    assert 5 not in only_pivot.ids[0].tolist() and only_pivot.probs[0].sum() == pytest.approx(1.0)


def test_merge_duplicate_ids():
    ids = np.array([[4, -1, 4, 2], [-1, -1, -1, -1]])
    probs = np.array([[0.25, 0.9, 0.25, 0.5], [0.1, 0.1, 0.1, 0.1]])
    out_ids, out_p = merge_duplicate_ids(ids, probs)
    assert out_ids.tolist() == [[2, 4], [-1, -1]]
    np.testing.assert_allclose(out_p, [[0.5, 0.5], [0.0, 0.0]])


def test_multi_source_mince_considers_every_source():
    third = cand("third", [[11, -1], [12, -1]], [[0.0, 0], [0.0, 0]], 0.1)
    pivot = cand("pivot", [[1, 2], [3, 4]], [[0.0, 0.0], [0.0, 0.0]], 1.0)
    source = cand("source", [[7, 8], [9, -1]], [[0.0, 0.0], [0.0, 0.0]], 0.5)
    assert fuse("mince", [pivot, source, third]).ids[:, 0].tolist() == [11, 12]


def test_the_recipe_names_exactly_the_registered_functions():
    names = typing.get_args(FusionSpec.model_fields["function"].annotation)
    fused = sorted(n for n in names if n != "none")  # `none`: a plain fine-tune, no fusion function
    assert fused == FUSION_FUNCTIONS.names() == ["avgce", "mince", "mince_token"]
    with pytest.raises(FusemergeError, match="fusion.function"):
        fuse("minimum", [PIVOT])
