"""The result of aligning a source token sequence to a pivot token sequence, and the tokenized inputs.

An alignment says, for every pivot position j, which source positions are aligned to it (ascending).
It is stored compressed (CSR: `indptr`, `indices`) because the teacher pass aligns millions of tokens and
a Python list per position would cost more than computing the alignment itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fusemerge.errors import FusemergeError

if TYPE_CHECKING:
    from fusemerge.fuse.align.profile import TokenizerProfile


@dataclass(frozen=True)
class Alignment:
    """For pivot position j, the source positions `indices[indptr[j]:indptr[j + 1]]`, ascending."""

    indptr: np.ndarray  # int64 [pivot_len + 1]
    indices: np.ndarray  # int64 [nnz]
    source_len: int

    @classmethod
    def from_lists(cls, lists: list[list[int]], source_len: int) -> Alignment:
        counts = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = np.fromiter((i for x in lists for i in x), dtype=np.int64, count=int(indptr[-1]))
        return cls(indptr, indices, source_len)

    @property
    def pivot_len(self) -> int:
        return len(self.indptr) - 1

    @property
    def counts(self) -> np.ndarray:
        """How many source positions each pivot position is aligned to."""
        return np.diff(self.indptr)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.indices[self.indptr[j] : self.indptr[j + 1]]

    def to_lists(self) -> list[list[int]]:
        flat = self.indices.tolist()
        bounds = self.indptr.tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=False)]

    def agreement(self, other: Alignment) -> float:
        """Fraction of pivot positions whose aligned source positions are identical in both alignments."""
        if other.pivot_len != self.pivot_len:
            raise ValueError("alignments of different pivot sequences")
        if self.pivot_len == 0:
            return 1.0
        same = np.array_equal(self.indptr, other.indptr) and np.array_equal(self.indices, other.indices)
        if same:
            return 1.0
        a, b = self.to_lists(), other.to_lists()
        return sum(x == y for x, y in zip(a, b, strict=True)) / self.pivot_len


@dataclass(frozen=True)
class TokenizedText:
    """One tokenizer's view of a text: ids, token strings, character spans and word-start marker.

    `offsets` is `None` for slow tokenizers, which cannot report spans; only `dtw` works then.
    `weights` (bytes of text each token stands for) and `text` let `offsets` share out a character
    that several tokens cover; without them such tokens share it evenly.
    """

    ids: np.ndarray  # int64 [n]
    tokens: list[str]
    offsets: np.ndarray | None  # int64 [n, 2] character spans
    marker: str
    weights: np.ndarray | None = None  # int64 [n]
    text: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize(
    tokenizer: Any, text: str, *, profile: TokenizerProfile, add_special_tokens: bool = True
) -> TokenizedText:
    """Tokenize `text`, with spans and piece weights when the tokenizer is a fast one.

    Args:
        tokenizer: a transformers tokenizer.
        text: the text every model sees (the conversation rendered with the pivot's chat template).
        profile: the same tokenizer's `TokenizerProfile` (marker, canonical pieces).
        add_special_tokens: let the tokenizer add its BOS/EOS, as the teacher pass does.
    """
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=fast)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    tokens = list(tokenizer.convert_ids_to_tokens(ids.tolist()))
    if not fast:
        return TokenizedText(ids, tokens, None, profile.marker, None, text)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return TokenizedText(ids, tokens, offsets, profile.marker, profile.weights(ids), text)


def check_offsets(offsets: np.ndarray | None, *, side: str) -> np.ndarray:
    """Spans as int64 [n, 2], or a one-line error naming the side that has none."""
    if offsets is None:
        raise FusemergeError(
            f"the {side} tokenizer is not a fast tokenizer, so it has no offset mapping: use tokens: dtw",
            key="alignment.tokens",
        )
    arr = np.ascontiguousarray(offsets, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise FusemergeError(f"{side} offsets must have shape [tokens, 2], got {list(arr.shape)}")
    return arr
