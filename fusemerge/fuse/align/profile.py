"""What alignment needs to know about a tokenizer, found by asking the tokenizer itself.

FuseChat's released code looks the word-start marker up in a table keyed by tokenizer class
(`LlamaTokenizer: '▁', LlamaTokenizerFast: 'Ġ'`) and patches it by model name ("Nous"): that breaks on
every class it has not seen. Here the marker and the byte alphabet are *probed*: tokenize "a b" and see
what is glued to "b"; tokenize "é" and see whether it comes back as the GPT-2 byte alphabet ('Ã©');
tokenize "\\n" and see whether it comes back as a SentencePiece byte-fallback piece ('<0x0A>').

The profile also gives every vocabulary entry a *canonical piece*: the UTF-8 bytes the token stands for
(markers turned back into spaces, byte-level letters and '<0xNN>' pieces turned back into bytes), so that
tokens of a byte-level BPE and of a SentencePiece model can be compared at all. Pieces are shown as
`bytes.decode("latin-1")` strings: one character per byte, which for printable text is exactly what a
byte-level vocabulary already looks like, so edit distances stay those of the reference code on ASCII.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any

import numpy as np

from fusemerge.errors import FusemergeError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE vocabularies are written in it)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in byte_alphabet().items()}


def _probe(tokenizer: Any, text: str) -> list[str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(tokenizer.convert_ids_to_tokens(ids))


@dataclass(frozen=True)
class TokenizerProfile:
    """A tokenizer's vocabulary as alignment sees it.

    Args:
        tokens: the token string of every id, as `convert_ids_to_tokens` gives it (`None` for holes).
        marker: the word-start marker ('▁', 'Ġ', or '' when words carry none).
        byte_level: the vocabulary is written in GPT-2's byte alphabet.
        byte_fallback: the vocabulary has SentencePiece '<0xNN>' byte pieces.
        special: id -> role ('bos', 'eos', 'unk', 'pad' or 'special') of tokens that stand for no text.
        literal: ids of added non-special tokens, whose string is plain text, not the byte alphabet.
    """

    tokens: tuple[str | None, ...]
    marker: str
    byte_level: bool
    byte_fallback: bool
    special: dict[int, str] = field(default_factory=dict)
    literal: frozenset[int] = frozenset()
    name: str = ""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenizerProfile:
        """Probe a transformers tokenizer (slow or fast) for its marker and byte alphabet."""
        try:
            words = _probe(tokenizer, "a b")
            accent = _probe(tokenizer, "é")
            newline = _probe(tokenizer, "\n")
        except Exception as exc:  # a tokenizer that cannot encode three characters is not usable at all
            raise FusemergeError(f"cannot probe tokenizer {type(tokenizer).__name__}: {exc}") from exc
        marker = _marker_from(words)
        strip = (lambda s: s.replace(marker, "")) if marker else (lambda s: s)
        byte_level = "".join(strip(t) for t in accent) == "".join(byte_alphabet()[b] for b in "é".encode())
        byte_fallback = any(_BYTE_PIECE.fullmatch(t) for t in newline)
        size = len(tokenizer)
        tokens = tuple(tokenizer.convert_ids_to_tokens(list(range(size))))
        special: dict[int, str] = {}
        literal: set[int] = set()
        for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", True):
                special[int(idx)] = "special"
            else:
                literal.add(int(idx))
        for role in ("unk", "pad", "eos", "bos"):  # bos last: it wins when one id plays several roles
            idx = getattr(tokenizer, f"{role}_token_id", None)
            if isinstance(idx, int) and 0 <= idx < size:
                special[idx] = role
                literal.discard(idx)
        return cls(
            tokens=tokens,
            marker=marker,
            byte_level=byte_level,
            byte_fallback=byte_fallback,
            special=special,
            literal=frozenset(literal),
            name=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def role_id(self, role: str) -> int | None:
        """The id playing `role` ('bos', 'eos', 'unk', 'pad'), if any."""
        for idx, r in self.special.items():
            if r == role:
                return idx
        return None

    def piece(self, token: str, idx: int | None = None) -> str:
        """The canonical piece of one token string: its bytes, one latin-1 character per byte."""
        if idx is not None and idx in self.literal:
            return token.encode("utf-8").decode("latin-1")
        if self.byte_level:
            decoder = _byte_decoder()
            if all(c in decoder for c in token):
                return bytes(decoder[c] for c in token).decode("latin-1")
        if self.byte_fallback:
            match = _BYTE_PIECE.fullmatch(token)
            if match:
                return chr(int(match.group(1), 16))
        text = token.replace(self.marker, " ") if self.marker else token
        return text.encode("utf-8").decode("latin-1")

    @cached_property
    def pieces(self) -> tuple[str | None, ...]:
        """Canonical piece of every id; `None` for special tokens and holes (they stand for no text)."""
        return tuple(
            None if tok is None or idx in self.special else self.piece(tok, idx)
            for idx, tok in enumerate(self.tokens)
        )

    @cached_property
    def piece_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for: 0 for special tokens and SentencePiece's lone '▁'.

        A lone '▁' that SentencePiece prepends to a text shares its character span with the character
        after it without standing for any of that character's bytes.
        """
        lengths = np.fromiter(
            (0 if p is None else len(p) for p in self.pieces), dtype=np.int64, count=len(self.tokens)
        )
        if self.marker and not self.byte_level:
            lone = [i for i, tok in enumerate(self.tokens) if tok == self.marker]
            lengths[lone] = 0
        return lengths

    def weights(self, ids: np.ndarray) -> np.ndarray:
        """`piece_bytes` of a sequence of ids (ids past the vocabulary weigh 1)."""
        ids = np.asarray(ids, dtype=np.int64)
        table = self.piece_bytes
        inside = (ids >= 0) & (ids < len(table))
        return np.where(inside, table[np.where(inside, ids, 0)], 1)

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the vocabulary, so a saved mapping is never reused with another tokenizer."""
        digest = hashlib.sha256()
        for tok in self.tokens:
            digest.update(b"\x00" if tok is None else tok.encode("utf-8", "surrogatepass") + b"\x00")
        return digest.hexdigest()[:16]


def _marker_from(words: list[str]) -> str:
    """The word-start marker: whatever is glued in front of 'b' when tokenizing 'a b'."""
    if words and words[-1].endswith("b") and len(words[-1]) > 1:
        return words[-1][:-1]
    if len(words) >= 2 and words[-1] == "b" and "a" not in words[-2]:
        return words[-2]  # the space is a token of its own
    return ""
