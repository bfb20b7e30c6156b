"""`alignment.spans: chain`, worked by hand: n-to-1 last piece, 1-to-n conditional, chain-rule next token.

Each case is a text both tokenizers cut differently, its byte spans, and teacher rows whose covered
probabilities are computed by hand; `spans: exact` leaves the same positions on the one-hot fallback.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusemerge.fuse.align import Alignment, TokenizedText, TokenizerProfile, transfer_topk
from fusemerge.fuse.align.offsets import byte_spans, offsets_alignment
from fusemerge.fuse.align.transfer import SpanText, last_pieces
from fusemerge.fuse.align.vocab import FirstPiece
from fusemerge.fuse.aligned import ALIGNED_FORMAT, _drop_older_format, aligned_identity
from fusemerge.fuse.store import TopKStore

LN = np.log


def _profile(tokens: list[str]) -> TokenizerProfile:
    return TokenizerProfile(tokens=tuple(tokens), marker="", byte_level=False, byte_fallback=False)


def _rows(rows: list[list[tuple[int, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), k), 0, dtype=np.int64)
    lps = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for r, row in enumerate(rows):
        for q, (i, p) in enumerate(row):
            ids[r, q], lps[r, q] = i, LN(p)
    return ids, lps


def _side(text: str, cuts: list[int], vocab: list[str]) -> TokenizedText:
    """A tokenized text from its character cut points; ids from the piece's place in `vocab`."""
    spans = np.array(list(zip(cuts[:-1], cuts[1:], strict=True)), dtype=np.int64)
    tokens = [text[a:b] for a, b in spans.tolist()]
    ids = np.array([vocab.index(t) for t in tokens], dtype=np.int64)
    weights = np.array([len(t.encode()) for t in tokens], dtype=np.int64)
    return TokenizedText(ids, tokens, spans, "", weights, text)


def _case(text, source_cuts, pivot_cuts, source_vocab, pivot_vocab):
    s, p = _side(text, source_cuts, source_vocab), _side(text, pivot_cuts, pivot_vocab)
    alignment = offsets_alignment(
        s.offsets, p.offsets, text=text, source_weights=s.weights, pivot_weights=p.weights
    )
    (ss, se), (ps, pe) = byte_spans(s), byte_spans(p)
    span = SpanText(
        text, s.ids, ss, se, ps, pe, _profile(source_vocab).pieces, FirstPiece(_profile(pivot_vocab))
    )
    ends = {"source_ends": s.offsets[:, 1], "pivot_ends": p.offsets[:, 1]}
    return s, p, alignment, span, ends


def _row(out, j: int) -> dict[int, float]:
    keep = out.ids[j] >= 0
    return dict(zip(out.ids[j][keep].tolist(), np.exp(out.logprobs[j][keep]).tolist(), strict=True))


def test_n_to_1_takes_the_distribution_at_the_last_piece():
    # "going!": pivot ['going', '!'] <- source ['go', 'ing', '!']. Pivot 'going' covers two source
    # tokens; no piece equals or contains it, so `exact` has nothing. The row after 'ing' predicts
    # what follows "going" exactly: '!' 0.7, '.' 0.2.
    source_vocab, pivot_vocab = ["go", "ing", "!", "."], ["going", "!", "."]
    s, p, alignment, span, ends = _case("going!", [0, 2, 5, 6], [0, 5, 6], source_vocab, pivot_vocab)
    assert alignment.to_lists() == [[0, 1], [2]]
    mapping = np.array([-1, -1, 1, 2])
    ids, lps = _rows([[(1, 0.6), (3, 0.1)], [(2, 0.7), (3, 0.2)], [(3, 0.5)]], k=2)
    pieces = {"pivot_pieces": ["going", "!"], "source_pieces": ["go", "ing", "!"]}
    exact = transfer_topk(alignment, ids, lps, mapping, p.ids, **pieces, **ends, spans="exact")
    chain = transfer_topk(
        alignment, ids, lps, mapping, p.ids, **pieces, **ends, spans="chain", span_text=span
    )
    assert not exact.from_teacher[0] and _row(exact, 0) == {1: 1.0}  # one-hot of the next gold '!'
    assert chain.from_teacher[0]
    assert _row(chain, 0) == pytest.approx({1: 0.7, 2: 0.2}, rel=1e-6)
    # dtw has no spans: the same n-to-1 rule, without span_text, where no piece matched
    assert last_pieces(alignment, np.array([-1, 2])).tolist() == [1, 2]
    no_spans = transfer_topk(alignment, ids, lps, mapping, p.ids, **pieces, spans="chain")
    assert _row(no_spans, 0) == pytest.approx({1: 0.7, 2: 0.2}, rel=1e-6)


def test_1_to_n_takes_the_teachers_conditional_given_the_consumed_prefix():
    # "it's": pivot ['it', "'", 's'] <- source ['it', "'s"]. Pivot "'" ends inside source "'s", where no
    # source row predicts from. The row after 'it' predicted "'s" 0.5, "'t" 0.2, "'" 0.1, ' is' 0.1:
    # given the text so far ends in "'", the candidates starting with "'" hold 0.8, of which "'s" goes on
    # with 's' and "'t" with 't'; "'" alone ends here (its next token is nobody's row).
    source_vocab = ["it", "'s", "'t", "'", " is"]
    pivot_vocab = ["it", "'", "s", "t", " is"]
    s, p, alignment, span, ends = _case("it's", [0, 2, 4], [0, 2, 3, 4], source_vocab, pivot_vocab)
    assert alignment.to_lists() == [[0], [1], [1]]
    mapping = np.array([0, 1, 1, 1, 4])  # each source token's first pivot piece
    ids, lps = _rows([[(1, 0.5), (2, 0.2), (3, 0.1), (4, 0.1)], [(4, 0.6), (3, 0.1)]], k=4)
    exact = transfer_topk(alignment, ids, lps, mapping, p.ids, **ends, spans="exact")
    chain = transfer_topk(alignment, ids, lps, mapping, p.ids, **ends, spans="chain", span_text=span)
    assert _row(exact, 1) == {2: 1.0} and not exact.from_teacher[1]
    assert chain.from_teacher[1]
    assert _row(chain, 1) == pytest.approx({2: 0.5 / 0.8, 3: 0.2 / 0.8}, rel=1e-5)
    assert list(chain.ids[1][:2]) == [2, 3]  # best first
    # the rows both rules cover are the same: 'it' takes row 0 (collisions on "'": max 0.5), 's' row 1
    for j in (0, 2):
        assert _row(chain, j) == pytest.approx(_row(exact, j), rel=1e-6)
    assert _row(chain, 0) == pytest.approx({1: 0.5, 4: 0.1}, rel=1e-6)


def test_1_to_n_without_a_candidate_sharing_the_prefix_keeps_the_one_hot():
    source_vocab, pivot_vocab = ["it", "'s", " is"], ["it", "'", "s", " is"]
    s, p, alignment, span, ends = _case("it's", [0, 2, 4], [0, 2, 3, 4], source_vocab, pivot_vocab)
    ids, lps = _rows([[(2, 0.9)], [(2, 0.5)]], k=1)
    out = transfer_topk(
        alignment, ids, lps, np.array([0, 1, 3]), p.ids, **ends, spans="chain", span_text=span
    )
    assert not out.from_teacher[1] and _row(out, 1) == {2: 1.0}


def test_a_next_pivot_token_spelt_by_several_source_tokens_takes_the_chain_rule_probability():
    # "abcd": pivot ['a', 'bcd'] <- source ['a', 'bc', 'd']. Pivot 'a' takes row 0, where source 'bc'
    # (0.5) stands for the pivot's next token 'bcd' only if 'd' follows: row 1 gives 'd' 0.4, so the
    # teacher's probability of 'bcd' is 0.5 * 0.4 = 0.2 (GOLD's merged group probability), not 0.5 on
    # the prefix mapping's 'b'. Pivot 'bcd' itself is n-to-1: the row after 'd'.
    source_vocab, pivot_vocab = ["a", "bc", "d", "x"], ["a", "bcd", "b", "x"]
    s, p, alignment, span, ends = _case("abcd", [0, 1, 3, 4], [0, 1, 4], source_vocab, pivot_vocab)
    assert alignment.to_lists() == [[0], [1, 2]]
    mapping = np.array([0, 2, -1, 3])
    ids, lps = _rows([[(1, 0.5), (3, 0.3)], [(2, 0.4), (3, 0.1)], [(3, 0.9), (0, 0.05)]], k=2)
    exact = transfer_topk(alignment, ids, lps, mapping, p.ids, **ends, spans="exact")
    chain = transfer_topk(alignment, ids, lps, mapping, p.ids, **ends, spans="chain", span_text=span)
    assert _row(exact, 0) == pytest.approx({2: 0.5, 3: 0.3}, rel=1e-6)
    assert _row(chain, 0) == pytest.approx({3: 0.3, 1: 0.2}, rel=1e-5)
    assert list(chain.ids[0]) == [3, 1]
    assert _row(chain, 1) == pytest.approx({3: 0.9, 0: 0.05}, rel=1e-6)
    assert not exact.from_teacher[1]
    # a piece outside its row's top-K: the chain is unknown and the row stays as `exact` has it
    ids2, lps2 = _rows([[(1, 0.5), (3, 0.3)], [(3, 0.1), (0, 0.1)], [(3, 0.9), (0, 0.05)]], k=2)
    kept = transfer_topk(alignment, ids2, lps2, mapping, p.ids, **ends, spans="chain", span_text=span)
    assert _row(kept, 0) == pytest.approx({2: 0.5, 3: 0.3}, rel=1e-6)


def test_unknown_span_rules_are_refused():
    alignment = Alignment.from_lists([[0]], source_len=1)
    with pytest.raises(ValueError, match="spans"):
        transfer_topk(alignment, np.zeros((1, 1)), np.zeros((1, 1)), np.array([0]), np.array([0]), spans="x")


def test_byte_spans_count_bytes_and_leave_zero_width_tokens_out():
    text = "aé!"
    tok = TokenizedText(
        np.array([0, 1, 2, 3]),
        ["<s>", "a", "é", "!"],
        np.array([[0, 0], [0, 1], [1, 2], [2, 3]]),
        "",
        None,
        text,
    )
    start, end = byte_spans(tok)
    assert np.isnan(start[0]) and np.isnan(end[0])
    assert start[1:].tolist() == [0, 1, 3] and end[1:].tolist() == [1, 3, 4]
    assert byte_spans(TokenizedText(np.array([0]), ["a"], None, "", None, "a")) is None


def test_first_piece_is_the_longest_pivot_piece_a_text_starts_with():
    profile = TokenizerProfile(
        tokens=("<0x20>", "▁", "re", "ret", "return", "x"), marker="▁", byte_level=False, byte_fallback=True
    )
    first = FirstPiece(profile)
    assert first("returned") == 4 and first("retx") == 3 and first("rx") == -1
    assert first(" a") == 1  # '▁' and its byte piece '<0x20>' are both ' ': the real token wins


def test_aligned_stores_carry_the_span_rules_and_older_formats_are_rebuilt(tmp_path):
    from fusemerge.fuse.align import VocabMapping

    mapping = VocabMapping(np.array([0, 1]), "exact", "s", "p", 2)
    pivot = {"model": "pivot", "tokenizer_hash": "h"}
    exact, chain = (
        aligned_identity({"model": "src"}, pivot, "offsets", mapping, spans) for spans in ("exact", "chain")
    )
    assert exact["alignment_spans"] == "exact" and chain["alignment_spans"] == "chain"
    assert exact["aligned_format"] == chain["aligned_format"] == ALIGNED_FORMAT
    old = tmp_path / "old"
    TopKStore.create_or_resume(
        old, {**exact, "aligned_format": ALIGNED_FORMAT - 1}, n_sequences=1, shard_size=1
    )
    lines: list[str] = []
    _drop_older_format(old, lines.append)
    assert not old.exists() and "rebuilt" in lines[0]
    current = tmp_path / "current"
    TopKStore.create_or_resume(current, chain, n_sequences=1, shard_size=1)
    teacher = tmp_path / "teacher"
    TopKStore.create_or_resume(teacher, {"kind": "teacher"}, n_sequences=1, shard_size=1)
    for folder in (current, teacher):
        _drop_older_format(folder, lines.append)
        assert json.loads((folder / "manifest.json").read_text())["identity"]
    assert len(lines) == 1
