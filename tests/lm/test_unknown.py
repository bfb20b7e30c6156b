"""The unknown-token share (`fusemerge.lm.unknown`): exact on known texts, 0 for byte-level tokenizers."""

from __future__ import annotations

from fusemerge.lm.chat import ChatSequence
from fusemerge.lm.tokens import ChatTokenizer
from fusemerge.lm.unknown import unknown_bytes, unknown_share
from tests.faults.fuse_fixtures import word_level_tokenizer

TEXT = "user: hi\nassistant: the café is a nice place<end>"


def _seq() -> ChatSequence:
    start = TEXT.index("the")
    return ChatSequence(1, TEXT, ((start, len(TEXT)),))


def test_unknown_bytes_are_the_bytes_of_unknown_words_inside_assistant_text():
    tok = word_level_tokenizer(["the", "is", "a", "user", "hi"])
    unk, total = unknown_bytes(_seq(), ChatTokenizer(tok))
    assistant = TEXT[TEXT.index("the") :]
    assert total == len(assistant.encode())
    # café (5 bytes), nice, place, and the pieces of <end> (<, end, >): everything but the, is, a
    expected = len("café".encode()) + len("nice") + len("place") + len("<end>")
    assert unk == expected


def test_byte_level_tokenizers_have_no_unknown_bytes(gpt2_tokenizer, qwen_tokenizer, mistral_tokenizer):
    for tok in (gpt2_tokenizer, qwen_tokenizer, mistral_tokenizer):
        assert unknown_share([_seq()], tok) == 0.0, type(tok).__name__


def test_the_unknown_token_written_in_the_text_is_not_unknown(gpt2_tokenizer):
    """GPT-2's unknown token is <|endoftext|>, which templates write as the end of a turn."""
    text = "the answer<|endoftext|>"
    seq = ChatSequence(1, text, ((0, len(text)),))
    assert gpt2_tokenizer.unk_token == "<|endoftext|>"
    assert unknown_bytes(seq, ChatTokenizer(gpt2_tokenizer))[0] == 0


def test_a_slow_tokenizer_is_measured_by_what_decoding_loses():
    import tempfile
    from pathlib import Path

    from transformers import BertTokenizerLegacy as BertTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "is", "a"]) + "\n")
        slow = BertTokenizer(str(vocab), do_lower_case=False)
    assert not slow.is_fast
    text = "the moon is a rock"
    seq = ChatSequence(1, text, ((0, len(text)),))
    assert unknown_bytes(seq, ChatTokenizer(slow)) == (len("moonrock"), len(text))
