"""MinED "dtw": hand-worked cases pin the cost and the tie-breaking; a transcription of the FuseChat
reference (`dtw` + `dist_fn` of FuseChat/train/align_token_and_vocab.py) is the oracle on real tokens."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

from fusemerge.corpora import chatterbot_conversations
from fusemerge.fuse.align import dtw_align, dtw_alignment
from fusemerge.fuse.align.dtw import mined_cost


def reference_dtw(
    source: list[str], pivot: list[str], source_marker: str, pivot_marker: str
) -> list[list[int]]:
    """The reference, transcribed: Python double loop, np.argmin over [diag, up, left] walking back."""

    def dist(a: str, b: str) -> float:
        aa, bb = a.replace(source_marker, ""), b.replace(pivot_marker, "")
        w = 0.1 if aa in bb or bb in aa else 1
        return Levenshtein.distance(aa, bb) * w

    matrix = np.zeros((len(source) + 1, len(pivot) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, a in enumerate(source):
        for j, b in enumerate(pivot):
            matrix[i + 1, j + 1] = dist(a, b) + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    out: list[list[int]] = [[] for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        out[j].append(i)
        diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = matrix[i - 1, j] if i > 0 else np.inf
        left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([diag, up, left])
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    out[0].append(0)
    return [x[::-1] for x in out]


def test_cost_is_edit_distance_tenth_when_contained():
    assert mined_cost("go", "going") == 3 * 0.1  # float64 0.30000000000000004, as the reference forms it
    assert mined_cost("ab", "bc") == 2
    assert mined_cost("", "xyz") == pytest.approx(0.3)  # the empty string is inside everything
    assert mined_cost("same", "same") == 0


def test_markers_are_removed_everywhere_not_only_in_front():
    # '▁▁' strips to '' and matches the lone 'Ġ' (also '') at cost 0: both are pure markers.
    assert dtw_align(["▁▁", "▁x"], ["Ġ", "Ġx"], source_marker="▁", pivot_marker="Ġ") == [[0], [1]]


def test_three_way_tie_goes_diagonal():
    # costs a/b:1, a/a:0, b/b:0, b/a:1 -> M = [[1, 1], [1, 2]]: at (1, 1) diag = up = left = 1.
    # diagonal first gives [[0], [1]]; up first would give [[0], [0, 1]], left first [[0, 1], [1]].
    assert dtw_align(["a", "b"], ["b", "a"], source_marker="", pivot_marker="") == [[0], [1]]


def test_up_beats_left_on_a_tie():
    # Worked by hand: M = [[2, 3, 5], [2.2, 4, 3.2], [2.3, 3.2, 3.3]]; at (2, 2) diag = 4 while
    # up = 0.2 + 3 and left = 1 + 2.2 are both 3.2 in float64: up wins, then diag to (0, 1), left to (0, 0).
    got = dtw_align(["ba", "b", "ab"], ["abc", "aa", "abc"], source_marker="", pivot_marker="")
    assert got == [[0], [0], [1, 2]]


def test_one_pivot_token_many_source_tokens_and_back():
    assert dtw_align(["a", "b"], ["ab"], source_marker="", pivot_marker="") == [[0, 1]]
    assert dtw_align(["ab"], ["a", "b"], source_marker="", pivot_marker="") == [[0], [0]]
    # crossing boundaries: 'ab|c' vs 'a|bc'; cheapest path is the diagonal ('a' in 'ab', 'c' in 'bc')
    assert dtw_align(["ab", "c"], ["a", "bc"], source_marker="", pivot_marker="") == [[0], [1]]


def test_lone_marker_swallows_a_run():
    # the known weakness: a bare '▁' costs 0.1 per character against anything
    got = dtw_align(["▁", "你", "好"], ["ä½łå¥½"], source_marker="▁", pivot_marker="Ġ")
    assert got == [[0, 1, 2]]


def test_empty_sides():
    assert dtw_align([], ["a"], source_marker="", pivot_marker="") == [[]]
    assert dtw_align(["a"], [], source_marker="", pivot_marker="") == []


def test_random_small_alphabet_matches_reference():
    """Tiny alphabets make ties and float sums like 0.1 + 0.2 everywhere: every one must go the same way."""
    rng = random.Random(0)
    alphabet = ["a", "b", "ab", "ba", "aa", "abc", "c", "", "▁", "▁a", "Ġ", "Ġb"]
    for _ in range(300):
        s = [rng.choice(alphabet) for _ in range(rng.randint(1, 7))]
        p = [rng.choice(alphabet) for _ in range(rng.randint(1, 7))]
        assert dtw_align(s, p, source_marker="▁", pivot_marker="Ġ") == reference_dtw(s, p, "▁", "Ġ"), (s, p)


@pytest.fixture(scope="module")
def short_texts() -> list[str]:
    texts = []
    for language, count in (("english", 12), ("chinese", 4), ("russian", 4)):
        convs = chatterbot_conversations(language)
        texts += [
            "\n".join(m["content"] for m in c["messages"]) for c in convs[:: len(convs) // count][:count]
        ]
    return texts


@pytest.mark.parametrize(("source", "pivot"), [("mistral", "qwen"), ("qwen", "gpt2"), ("gpt2", "mistral")])
def test_real_tokens_match_reference(request, short_texts, source, pivot):
    tok_s = request.getfixturevalue(f"{source}_tokenizer")
    tok_p = request.getfixturevalue(f"{pivot}_tokenizer")
    markers = {"mistral": "▁", "qwen": "Ġ", "gpt2": "Ġ"}
    for text in short_texts:
        s = tok_s.convert_ids_to_tokens(tok_s(text)["input_ids"])
        p = tok_p.convert_ids_to_tokens(tok_p(text)["input_ids"])
        expected = reference_dtw(s, p, markers[source], markers[pivot])
        assert dtw_align(s, p, source_marker=markers[source], pivot_marker=markers[pivot]) == expected


def test_band_wide_enough_is_exact_and_narrow_band_still_aligns_everything(
    short_texts, mistral_tokenizer, qwen_tokenizer
):
    mistral = mistral_tokenizer
    text = " ".join(short_texts[:12])
    s = mistral.convert_ids_to_tokens(mistral(text)["input_ids"])
    p = qwen_tokenizer.convert_ids_to_tokens(qwen_tokenizer(text)["input_ids"])
    full = dtw_alignment(s, p, source_marker="▁", pivot_marker="Ġ")
    wide = dtw_alignment(s, p, source_marker="▁", pivot_marker="Ġ", band=len(p))
    assert full.to_lists() == wide.to_lists()
    narrow = dtw_alignment(s, p, source_marker="▁", pivot_marker="Ġ", band=24)
    assert narrow.agreement(full) > 0.95
    # a path through the band still visits every source position, in order
    assert sorted(set(narrow.indices.tolist())) == list(range(len(s)))
    assert np.all(np.diff(narrow.indices) >= 0)
