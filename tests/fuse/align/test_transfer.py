"""Distribution transfer, worked by hand: one-to-one, one-to-many, many-to-one, unmapped ids, fallback."""

from __future__ import annotations

import numpy as np

from fusemerge.fuse.align import Alignment, choose_source_positions, transfer_topk

LN = np.log


def _topk(rows: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([[i for i, _ in r] for r in rows])
    lps = np.array([[LN(p) for _, p in r] for r in rows], dtype=np.float32)
    return ids, lps


def test_one_to_many_takes_the_equal_piece_then_the_containing_one():
    # pivot 'going' <- source ['go', 'ing']: nothing equal; 'go' does not contain 'going' -> none
    # pivot ' the'  <- source [',', ' the']: equal piece wins
    # pivot 'at'    <- source ['c', 'cat', 'at'] : equal 'at' beats the earlier containing 'cat'
    # pivot 'ca'    <- source ['c', 'cat']        : nothing equal, 'cat' contains 'ca'
    # pivot ' '     <- source [' a', ' b']        : a bare marker matches nothing
    alignment = Alignment.from_lists([[0, 1], [2, 3], [4, 5, 6], [7, 8], [9, 10]], source_len=11)
    source = ["go", "ing", ",", " the", "c", "cat", "at", "c", "cat", " a", " b"]
    pivot = ["going", " the", "at", "ca", " "]
    chosen = choose_source_positions(alignment, pivot_pieces=pivot, source_pieces=source)
    assert chosen.tolist() == [-1, 3, 6, 8, -1]


def test_rules_end_to_end():
    # pivot positions: 0 <- [0] one-to-one; 1 <- [1] and 2 <- [1] many-to-one (both take source 1);
    # 3 <- [] nothing aligned; 4 <- [2] but every id unmapped; 5 <- [3] last position, one-to-one.
    alignment = Alignment.from_lists([[0], [1], [1], [], [2], [3]], source_len=4)
    mapping = np.array([10, 11, 11, -1, 12])  # source ids 1 and 2 both become pivot id 11; 3 has none
    ids, lps = _topk(
        [
            [(0, 0.5), (1, 0.3), (4, 0.1)],
            [(2, 0.4), (1, 0.35), (0, 0.2)],  # 1 and 2 collide on 11: keep 0.4
            [(3, 0.6), (3, 0.2), (3, 0.1)],
            [(4, 0.7), (3, 0.2), (0, 0.05)],
        ]
    )
    gold = np.array([100, 101, 102, 103, 104, 105])
    out = transfer_topk(alignment, ids, lps, mapping, gold)
    np.testing.assert_array_equal(out.ids[0], [10, 11, 12])
    np.testing.assert_allclose(np.exp(out.logprobs[0]), [0.5, 0.3, 0.1], rtol=1e-6)
    for j in (1, 2):
        np.testing.assert_array_equal(out.ids[j], [11, 10, -1])
        np.testing.assert_allclose(np.exp(out.logprobs[j][:2]), [0.4, 0.2], rtol=1e-6)
    # no teacher at 3 and 4: one-hot of the *next* gold token (104, 105), not the current one
    np.testing.assert_array_equal(out.ids[3], [104, -1, -1])
    np.testing.assert_array_equal(out.ids[4], [105, -1, -1])
    assert out.logprobs[3, 0] == 0.0 and np.isneginf(out.logprobs[3, 1:]).all()
    # the unmapped source id 3 (p=0.2) is dropped, so this row sums to 0.75 < 1
    np.testing.assert_array_equal(out.ids[5], [12, 10, -1])
    np.testing.assert_allclose(np.exp(out.logprobs[5]).sum(), 0.75, rtol=1e-6)
    assert out.from_teacher.tolist() == [True, True, True, False, False, True]


def test_last_position_without_teacher_has_nothing_to_predict():
    alignment = Alignment.from_lists([[0], []], source_len=1)
    ids, lps = _topk([[(0, 0.9)]])
    out = transfer_topk(alignment, ids, lps, np.array([5]), np.array([7, 8]))
    assert out.ids.tolist() == [[5], [-1]]
    assert np.isneginf(out.logprobs[1, 0])


def test_mapping_shorter_than_logit_ids():
    """Models pad their logits past the tokenizer; such ids have no pivot id."""
    alignment = Alignment.from_lists([[0]], source_len=1)
    ids, lps = _topk([[(1, 0.5), (99, 0.4)]])
    out = transfer_topk(alignment, ids, lps, np.array([3, 4]), np.array([0]))
    assert out.ids.tolist() == [[4, -1]]


def test_same_end_rule_drops_sources_that_predict_from_another_prefix():
    # text "f(self" ; pivot tokens 'f' '(' 'self' ; source tokens 'f' '(self'
    # pivot '(' is aligned one-to-one to source '(self', which ends 4 characters later: its next-token
    # distribution is about what follows "(self", not "(" -> no teacher distribution there.
    alignment = Alignment.from_lists([[0], [1], [1]], source_len=2)
    pivot_ends, source_ends = np.array([1, 2, 6]), np.array([1, 6])
    ids, lps = _topk([[(5, 0.9)], [(6, 0.8)]])
    mapping = np.arange(10)
    pivot_ids = np.array([1, 2, 3])
    loose = transfer_topk(alignment, ids, lps, mapping, pivot_ids)
    strict = transfer_topk(
        alignment, ids, lps, mapping, pivot_ids, source_ends=source_ends, pivot_ends=pivot_ends
    )
    assert loose.from_teacher.tolist() == [True, True, True]
    assert strict.from_teacher.tolist() == [True, False, True]
    assert strict.ids[1, 0] == 3 and strict.logprobs[1, 0] == 0.0  # falls back to the next gold token
    assert strict.ids[2, 0] == 6  # 'self' ends with '(self': the prediction points coincide
