"""Passthrough: copy one model's tensors (optionally scaled), as mergekit's `passthrough`.

On its own it copies a model, optionally casting or scaling it; its real use is in frankenmerges
(`slices` stacking layers of several models), which run through the mergekit fallback engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusemerge.merge.kernels.chunks import compute_dtype
from fusemerge.merge.lazy_torch import torch
from fusemerge.merge.methods.registry import merge_method
from fusemerge.merge.parameters import Param


@merge_method(
    "passthrough",
    pretty_name="Passthrough",
    reference_url="https://github.com/arcee-ai/mergekit",
    base="ignored",
    max_models=1,
    per_model={"scale": Param(float | None, None, "multiply the tensor by this")},
)
def passthrough(tensors: Sequence[torch.Tensor], base: None, *, scale: list[float | None]) -> torch.Tensor:
    """The single input model's tensor, times `scale` when given."""
    (tensor,) = tensors
    out = tensor.to(compute_dtype(tensors))
    return out if scale[0] is None else out * scale[0]
