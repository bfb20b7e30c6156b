"""MinED "dtw": hand-worked cases pin the cost and the tie-breaking; a transcription of the FuseChat
reference (`dtw` + `dist_fn` of FuseChat/train/align_token_and_vocab.py) is the oracle on real tokens."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

import fusemerge.fuse.align.dtw as dtw_module
from fusemerge.fuse.align import (
    ALIGNMENT_METHODS,
    TokenizerProfile,
    align,
    align_batch,
    dtw_align,
    dtw_align_batch,
    dtw_alignment,
    dtw_alignment_batch,
    tokenize,
)
from fusemerge.fuse.align.dtw import mined_cost
from fusemerge.fuse.align.dtw_kernel import _levenshtein, _myers
from fusemerge.offline.corpora import chatterbot_conversations


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


# --- the batched entry point: one compiled call for many pairs, identical to one call per pair ---------


def _per_pair(pairs, source_marker, pivot_marker, band=None):
    return [
        dtw_align(s, p, source_marker=source_marker, pivot_marker=pivot_marker, band=band) for s, p in pairs
    ]


def test_levenshtein_kernels_match_rapidfuzz():
    """The batch computes edit distances itself (bit-parallel up to 64 code points, a DP beyond)."""
    rng = random.Random(1)
    row = np.empty(300, dtype=np.int64)
    peq = np.zeros(0x110000, dtype=np.uint64)
    for alphabet in ("ab", "abcdefgh", "aé你\ud800🙂"):
        for _ in range(3000):
            a, b = (
                "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 5, 63, 64, 65, 200))))
                for _ in "ab"
            )
            ca, cb = (np.frombuffer(x.encode("utf-32-le", "surrogatepass"), dtype=np.uint32) for x in (a, b))
            expected = Levenshtein.distance(a, b)
            assert _levenshtein(ca, 0, len(ca), cb, 0, len(cb), row) == expected, (a, b)
            if 0 < len(ca) <= 64:
                for q, c in enumerate(ca):
                    peq[c] |= np.uint64(1) << np.uint64(q)
                assert _myers(peq, len(ca), cb, 0, len(cb)) == expected, (a, b)
                peq[ca] = 0


def test_batch_of_random_pairs_equals_per_pair_and_reference():
    """Empty and length-1 sequences, bare markers, strings that strip to the same text, bands on and off."""
    rng = random.Random(2)
    alphabet = ["a", "b", "ab", "ba", "aa", "abc", "c", "", "▁", "▁a", "▁▁", "Ġ", "Ġb", "▁Ġa", "你", "x" * 70]
    pairs = [
        (
            [rng.choice(alphabet) for _ in range(rng.choice((0, 1, 1, 2, 5, 9)))],
            [rng.choice(alphabet) for _ in range(rng.choice((0, 1, 1, 2, 5, 9)))],
        )
        for _ in range(400)
    ]
    got = dtw_align_batch(pairs, source_marker="▁", pivot_marker="Ġ")
    assert got == _per_pair(pairs, "▁", "Ġ")
    assert all(g == reference_dtw(s, p, "▁", "Ġ") for g, (s, p) in zip(got, pairs, strict=True) if s and p)
    for band in (1, 2, 4):
        assert dtw_align_batch(pairs, source_marker="▁", pivot_marker="Ġ", band=band) == _per_pair(
            pairs, "▁", "Ġ", band
        )
    assert dtw_align_batch(pairs, source_marker="", pivot_marker="▁") == _per_pair(pairs, "", "▁")


def test_batch_edge_cases():
    assert dtw_align_batch([], source_marker="", pivot_marker="") == []
    pairs = [([], ["a"]), (["a"], []), ([], []), (["a"], ["a"]), (["ab"], ["a", "b"])]
    assert dtw_align_batch(pairs, source_marker="", pivot_marker="") == [[[]], [], [], [[0]], [[0], [0]]]
    lengths = [a.source_len for a in dtw_alignment_batch(pairs, source_marker="", pivot_marker="")]
    assert lengths == [0, 1, 0, 1, 1]
    # as per pair: an empty side needs no band, so a bad band is only an error where a table is filled
    assert dtw_align_batch(pairs[:3], source_marker="", pivot_marker="", band=0) == [[[]], [], []]
    with pytest.raises(ValueError, match="band must be >= 1"):
        dtw_align_batch(pairs, source_marker="", pivot_marker="", band=0)
    # long tokens (past one machine word, past what an int8 memo holds) take the general path
    long_pairs = [(["q" * 80, "b"], ["q" * 79 + "z", "q" * 200]), (["a" * 65], ["a" * 64])]
    assert dtw_align_batch(long_pairs, source_marker="", pivot_marker="") == _per_pair(long_pairs, "", "")
    assert dtw_align_batch(long_pairs, source_marker="", pivot_marker="")[0] == reference_dtw(
        *long_pairs[0], "", ""
    )


def test_batch_split_for_a_small_memo_changes_nothing(monkeypatch):
    pairs = [(["ab", "c", "▁d"], ["a", "bc", "Ġd"]), (["x", "y"], ["xy"]), (["go"], ["going", "o"])] * 5
    expected = _per_pair(pairs, "▁", "Ġ")
    monkeypatch.setattr(dtw_module, "_MEMO_BYTES", 4)
    assert dtw_align_batch(pairs, source_marker="▁", pivot_marker="Ġ") == expected


@pytest.mark.parametrize(("source", "pivot"), [("mistral", "qwen"), ("qwen", "gpt2"), ("gpt2", "mistral")])
def test_batch_on_real_tokens_equals_per_pair(request, short_texts, source, pivot):
    tok_s = request.getfixturevalue(f"{source}_tokenizer")
    tok_p = request.getfixturevalue(f"{pivot}_tokenizer")
    markers = {"mistral": "▁", "qwen": "Ġ", "gpt2": "Ġ"}
    texts = [*short_texts, " ".join(short_texts[:12])]
    pairs = [
        (
            tok_s.convert_ids_to_tokens(tok_s(t)["input_ids"]),
            tok_p.convert_ids_to_tokens(tok_p(t)["input_ids"]),
        )
        for t in texts
    ]
    sm, pm = markers[source], markers[pivot]
    for band in (None, 3, 24):
        assert dtw_align_batch(pairs, source_marker=sm, pivot_marker=pm, band=band) == _per_pair(
            pairs, sm, pm, band
        )
    got = dtw_align_batch(pairs[:6], source_marker=sm, pivot_marker=pm)
    assert got == [reference_dtw(s, p, sm, pm) for s, p in pairs[:6]]


def test_registered_dtw_has_a_batch_and_align_batch_uses_it(short_texts, mistral_tokenizer, qwen_tokenizer):
    assert ALIGNMENT_METHODS.get("dtw").batch_fn is not None
    profiles = [TokenizerProfile.from_tokenizer(t) for t in (mistral_tokenizer, qwen_tokenizer)]
    m = [tokenize(mistral_tokenizer, t, profile=profiles[0]) for t in short_texts]
    q = [tokenize(qwen_tokenizer, t, profile=profiles[1]) for t in short_texts]
    # mixed markers in one batch: mistral -> qwen, qwen -> mistral and qwen -> qwen pairs interleaved
    pairs = [x for k in range(len(m)) for x in ((m[k], q[k]), (q[k], m[k]), (q[k], q[k]))]
    for band in (None, 5):
        got = align_batch("dtw", pairs, band=band)
        assert [a.to_lists() for a in got] == [align("dtw", s, p, band=band).to_lists() for s, p in pairs]
    offsets = align_batch("offsets", pairs[:4])  # no batched form: falls back to one call per pair
    assert [a.to_lists() for a in offsets] == [align("offsets", s, p).to_lists() for s, p in pairs[:4]]
