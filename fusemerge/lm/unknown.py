"""How much of a text a tokenizer cannot represent: the bytes its unknown token (`<unk>`) stands for.

Why it matters: a word-level tokenizer that maps every rare word to `<unk>` makes the text easy to
predict, because one token then stands for many different bytes. Its cross-entropy is low for the wrong
reason, so it wins MinCE (fusion picks the teacher of the lowest cross-entropy per sequence) and it ranks
first in bits per byte, although it models none of those bytes. Byte-level BPEs (GPT-2, Qwen, Llama 3)
and SentencePiece with byte fallback (Llama 2, Mistral) have no unknown token, so their share is 0.

    from fusemerge.lm.unknown import unknown_bytes, unknown_share
    unk, total = unknown_bytes(seq, chat_tok)     # over the assistant text of one ChatSequence
    share = unknown_share(sequences, tokenizer)   # over many, as a fraction of their assistant bytes

Both the fuse input check (`fusemerge.fuse.inputs`) and `fusemerge eval` measure it here, on the same
bytes eval scores: the assistant text the model's tokens cover.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from fusemerge.lm.chat import ChatSequence
from fusemerge.lm.tokens import ChatTokenizer

# Above this share of the assistant bytes the model's cross-entropy and bits per byte say little about
# the text: fuse refuses such a teacher and eval flags such a model. Below WARN_SHARE nothing is said.
UNKNOWN_SHARE_LIMIT = 0.01
WARN_SHARE = 0.001


def unknown_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's unknown token, or None when it has none (byte-level vocabularies)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return int(unk) if unk is not None else None


def unknown_bytes(seq: ChatSequence, chat_tok: ChatTokenizer) -> tuple[int, int]:
    """(UTF-8 bytes of assistant text covered by unknown tokens, UTF-8 bytes of assistant text).

    A fast tokenizer's offsets give each unknown token's characters. A slow one has none: the unknown
    bytes of each assistant span are then what decoding its tokens without the unknown token loses.
    The unknown token written literally in the text (GPT-2's `<|endoftext|>` is its unknown token and
    its end of text) is that token, not an unknown one, and is not counted.
    """
    total = sum(len(seq.text[a:b].encode("utf-8")) for a, b in seq.spans)
    unk = unknown_id(chat_tok.tokenizer)
    if unk is None or total == 0:
        return 0, total
    if not chat_tok.fast:
        return min(total, _slow_unknown_bytes(seq, chat_tok.tokenizer, unk)), total
    ids, mask, offsets = chat_tok.with_offsets(seq)
    assert offsets is not None  # a fast tokenizer has offsets
    literal = str(getattr(chat_tok.tokenizer, "unk_token", "") or "")
    covered = sorted(
        (int(offsets[i, 0]), int(offsets[i, 1]))
        for i in np.flatnonzero(mask & (ids == unk))
        if seq.text[int(offsets[i, 0]) : int(offsets[i, 1])] != literal
    )
    spans = sorted(seq.spans)
    count, end = 0, 0
    for a, b in covered:
        a = max(a, end)
        for s, e in spans:  # only the part inside assistant text
            lo, hi = max(a, s), min(b, e)
            if hi > lo:
                count += len(seq.text[lo:hi].encode("utf-8"))
        end = max(end, b)
    return count, total


def _slow_unknown_bytes(seq: ChatSequence, tokenizer: Any, unk: int) -> int:
    literal = str(getattr(tokenizer, "unk_token", "") or "")

    def nbytes(text: str) -> int:  # whitespace aside: decoding may not restore it exactly
        return len("".join(text.split()).encode("utf-8"))

    lost = 0
    for a, b in seq.spans:
        text = seq.text[a:b]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if unk not in ids:
            continue
        kept = tokenizer.decode([i for i in ids if i != unk], skip_special_tokens=False)
        written = nbytes(literal) * text.count(literal) if literal else 0
        lost += max(0, nbytes(text) - nbytes(kept) - written)
    return lost


def unknown_share(sequences: Iterable[ChatSequence], tokenizer: Any) -> float:
    """The share of the sequences' assistant bytes that `tokenizer` maps to its unknown token (0 to 1)."""
    if unknown_id(tokenizer) is None:
        return 0.0
    chat_tok = ChatTokenizer(tokenizer)
    unk = total = 0
    for seq in sequences:
        u, t = unknown_bytes(seq, chat_tok)
        unk, total = unk + u, total + t
    return unk / total if total else 0.0
