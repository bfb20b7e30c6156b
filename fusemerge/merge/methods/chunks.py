"""Elementwise work in bounded chunks.

Merging a 65M-element embedding in float32 needs several full-size temporaries if written naively; doing
the elementwise part over flat slices of a few million elements keeps the temporaries small, so peak memory
stays near the size of the inputs themselves whatever the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHUNK_ELEMENTS = 1 << 22


def compute_dtype(tensors: Sequence[torch.Tensor | None]) -> torch.dtype:
    import torch

    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def spans(numel: int, chunk: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    for start in range(0, numel, chunk):
        yield slice(start, min(numel, start + chunk))
