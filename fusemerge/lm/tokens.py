"""One model's tokens of a `ChatSequence`: token ids, the assistant-token mask, and character offsets.

Why character spans: a fast tokenizer's `return_offsets_mapping` gives each token's characters; a token is
an assistant token when its characters overlap a span. Slow tokenizers have no offsets, so the text is cut
at span boundaries and each piece tokenized alone; pieces then never share a token, which can differ from
tokenizing the whole text at the boundaries (usually a space or newline).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fusemerge.lm.chat import ChatSequence


class ChatTokenizer:
    """One model's view of a ChatSequence: token ids and the assistant-token mask.

    The text is tokenized without special tokens (the template already wrote them as text), and the
    model's BOS is put in front when its tokenizer adds one to plain text, as it did in training.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and len(full) > len(plain) and full[0] == bos else None

    def __call__(self, seq: ChatSequence) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], mask bool [n]); mask[t] is True where token t belongs to an assistant turn.

        Row t of this model's top-K store is the distribution at token t (over token t + 1).
        """
        ids, mask, _ = self.with_offsets(seq)
        return ids, mask

    def with_offsets(self, seq: ChatSequence) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, mask, offsets int64 [n, 2] or None for slow tokenizers); a prepended BOS has (0, 0).

        The offsets are what token alignment by character spans ("offsets") and eval's byte count need.
        """
        offsets = None
        if self.fast:
            enc = self.tokenizer(seq.text, add_special_tokens=False, return_offsets_mapping=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(ids), dtype=bool)
            for start, end in seq.spans:
                mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        else:
            ids, mask = self._by_segments(seq)
        if self.bos is not None and (len(ids) == 0 or ids[0] != self.bos):
            ids = np.concatenate([np.asarray([self.bos], dtype=np.int64), ids])
            mask = np.concatenate([np.zeros(1, dtype=bool), mask])
            if offsets is not None:
                offsets = np.concatenate([np.zeros((1, 2), dtype=np.int64), offsets])
        return ids, mask, offsets

    def _by_segments(self, seq: ChatSequence) -> tuple[np.ndarray, np.ndarray]:
        cuts = sorted({0, len(seq.text), *(p for span in seq.spans for p in span)})
        ids: list[int] = []
        mask: list[bool] = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            piece = self.tokenizer(seq.text[a:b], add_special_tokens=False)["input_ids"]
            inside = any(s <= a and b <= e for s, e in seq.spans)
            ids.extend(piece)
            mask.extend([inside] * len(piece))
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)

    def offsets(self, text: str) -> np.ndarray:
        """Character offsets of each token of `text` (fast tokenizers only), without a BOS."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
