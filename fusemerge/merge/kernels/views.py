"""Tensors as the numba kernels read them, and when the kernels apply at all.

The kernels work on CPU arrays in float32 arithmetic; bf16 data is handed over as its raw bits (no copy),
so a 2-byte element is read once per pass. Elsewhere (a GPU, float64 inputs) the torch paths run.
"""

from __future__ import annotations

import numpy as np

from fusemerge.merge.lazy_torch import torch


def use_kernels(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """The numba kernels run for CPU tensors computed in float32."""
    return tensor.device.type == "cpu" and dtype == torch.float32


def kernel_view(chunk: torch.Tensor) -> np.ndarray:
    """A contiguous CPU chunk as the kernels read it: bf16 as its raw bits (uint16, no copy), float32 as
    is, anything else converted to float32."""
    if chunk.dtype == torch.bfloat16:
        return chunk.contiguous().view(torch.int16).numpy().view(np.uint16)
    if chunk.dtype != torch.float32:
        chunk = chunk.to(torch.float32)
    return chunk.contiguous().numpy()
