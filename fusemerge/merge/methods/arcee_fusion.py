"""Arcee Fusion: take the other model's deltas only where they matter most, as mergekit's `arcee_fusion`.

Importance of each element is |delta| times the KL divergence between the softmaxes of the two models'
rows; elements whose importance is at least median + 1.5 * IQR take the other model's value, the rest keep
the base's. The quartiles are exact (k-th value selection over the tensor) and so deterministic; mergekit
estimates them from a random sample of one million elements for larger tensors, so on those the two
thresholds, and the few elements near them, can differ.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusemerge.merge.kernels.chunks import compute_dtype
from fusemerge.merge.lazy_torch import F, torch
from fusemerge.merge.methods.registry import merge_method


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    eps = 1e-8
    p = F.softmax(model, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (model - base).abs() * kl


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """sorted(values)[int(q * (n - 1))], as mergekit indexes its sorted sample, without sorting."""
    flat_values = values.reshape(-1)
    index = int(torch.tensor(q, dtype=torch.float32) * (flat_values.numel() - 1))
    return torch.kthvalue(flat_values, index + 1).values


@merge_method(
    "arcee_fusion",
    pretty_name="Arcee Fusion",
    reference_url="https://arcee.ai",
    base="required",
    min_models=1,
    max_models=1,
)
def arcee_fusion(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Fuse in the other model's most important changes (|delta| x row KL above median + 1.5 IQR) (Arcee 2025)."""
    dtype = compute_dtype([*tensors, base])
    b, m = base.to(dtype), tensors[0].to(dtype)
    scores = importance(m, b)
    q1, median, q3 = (quantile(scores, q) for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    keep = (scores >= threshold).to(dtype)
    del scores
    return b + (m - b) * keep
