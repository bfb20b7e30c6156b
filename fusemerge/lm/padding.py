"""Right padding with an attention mask: how every batch of token rows is built (teacher, eval, training).

Right padding keeps each sequence's real tokens at positions 0..n-1, so row t of a store, position t of the
student's logits and token t of the text stay the same index; the attention mask (1 on real tokens) is
what `topk_forward` uses to drop the padding before the output head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def pad_right(rows: Sequence[Any], value: int) -> tuple[np.ndarray, np.ndarray]:
    """(padded int64 [B, W], attention int64 [B, W]) with W the longest row; `value` fills the rest."""
    width = max(len(r) for r in rows)
    padded = np.full((len(rows), width), value, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
        attention[i, : len(r)] = 1
    return padded, attention


def pad_token_id(tokenizer: Any, *, fallback: int = 0) -> int:
    """The tokenizer's padding id, else `fallback` (the attention mask hides it either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback
