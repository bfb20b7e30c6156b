"""The FuseChat training loss, computed sparsely: `lambda * CLM + (1 - lambda) * fusion`.

    from fusemerge.fuse.loss import fusion_loss
    parts = fusion_loss(logits, labels, target_ids, target_probs, lambda_=0.9, kind="ce")
    parts.loss.backward()

Both terms are means over the positions that have a label (assistant tokens; the next-token shift is
already in `labels`: position t is trained to predict token t + 1). The fusion term at a position is
`-sum_k q_k * log p(id_k)` (`ce`) or `sum_k q_k * (log q_k - log p(id_k))` (`kl`: the same gradient,
a value that is 0 when the student matches the teacher).

Why sparse: the reference implementation scatters the K teacher probabilities into a dense
[batch, length, vocab] target, which is 2 x 2048 x 152k floats (2.5 GB) per micro-batch for a Qwen-size
vocabulary. Here only the labelled rows' logits are upcast, the log-normaliser is one `logsumexp` per row,
and the K log-probs are `gather`ed: log p(v) = z_v - logsumexp(z). The CLM term shares that normaliser, so
the fusion term costs a gather of K columns on top of plain CLM.

A row whose target probabilities sum to 0 has no teacher distribution: it falls back to the one-hot of
the gold next token, i.e. contributes exactly like the CLM term (DESIGN.md 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
LossKind = Literal["ce", "kl"]


@dataclass(frozen=True)
class LossParts:
    """The training loss and its two terms (detached), for logging."""

    loss: torch.Tensor
    clm: torch.Tensor
    fusion: torch.Tensor
    tokens: int


def fusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    *,
    lambda_: float = 0.9,
    kind: LossKind = "ce",
) -> LossParts:
    """`lambda * CLM + (1 - lambda) * fusion` over the labelled positions.

    Args:
        logits: [B, L, V] the student's logits at every position (any float dtype).
        labels: [B, L] the gold next token at each position, IGNORE_INDEX where there is none.
        target_ids: [B, L, K] pivot ids of the fused target (-1 empty); None only with lambda_ == 1.
        target_probs: [B, L, K] their probabilities q (rows sum to 1, or 0: no teacher).
        lambda_: weight of the CLM term; 1 is plain causal LM training, 0 pure distillation.
        kind: "ce" (the paper) or "kl".
    """
    import torch

    if kind not in ("ce", "kl"):
        raise ValueError(f"unknown fusion loss {kind!r} (ce or kl)")
    keep = labels != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:  # nothing to learn in this batch: a zero that still reaches every parameter's graph
        zero = logits.sum() * 0.0
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    z = logits[keep]  # [N, V]: only labelled rows are upcast (float64 stays float64, for tests)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    gold = labels[keep].long()
    log_norm = torch.logsumexp(z, dim=-1)  # [N]
    if lambda_ == 1.0:
        clm = (log_norm - z.gather(1, gold.unsqueeze(1)).squeeze(1)).mean()
        return LossParts(clm, clm.detach(), torch.zeros_like(clm).detach(), count)
    if target_ids is None or target_probs is None:
        raise ValueError("the fusion term needs target_ids and target_probs (lambda < 1)")
    ids = target_ids[keep].long()
    listed = ids >= 0
    q = torch.where(listed, target_probs[keep].to(z.dtype), 0.0)
    # one gather for the gold column and the K target columns: one sparse gradient instead of two
    picked = z.gather(1, torch.cat([gold.unsqueeze(1), ids.clamp(min=0)], dim=1))
    clm_rows = log_norm - picked[:, 0]
    clm = clm_rows.mean()
    logp = picked[:, 1:] - log_norm.unsqueeze(1)  # [N, K]
    fusion_rows = -(q * logp).sum(dim=1)
    if kind == "kl":
        fusion_rows = fusion_rows + torch.where(q > 0, q * torch.log(q.clamp(min=1e-30)), 0.0).sum(dim=1)
    has_teacher = q.sum(dim=1) > 0
    fusion_rows = torch.where(has_teacher, fusion_rows, clm_rows)
    fusion = fusion_rows.mean()
    loss = fusion if lambda_ == 0.0 else lambda_ * clm + (1.0 - lambda_) * fusion
    return LossParts(loss, clm.detach(), fusion.detach(), count)
