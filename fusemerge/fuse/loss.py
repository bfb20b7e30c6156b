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
vocabulary. Here both terms are one weighted cross-entropy over K + 1 columns per row (the gold token and
the K target ids), gathered from one `log_softmax`; a custom backward writes softmax(z) * sum(w) and
scatter-adds -w into that same buffer. So the whole loss holds one [rows, vocab] tensor, as plain
cross-entropy does, and costs about what transformers' own causal-LM loss costs (bench/fuse_bench.py).

A row whose target probabilities sum to 0 has no teacher distribution: it falls back to the one-hot of
the gold next token, i.e. contributes exactly like the CLM term (the align step's fallback too,
`fusemerge.fuse.align.transfer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

IGNORE_INDEX = -100
LossKind = Literal["ce", "kl"]


@dataclass(frozen=True)
class LossParts:
    """The training loss and its two terms (detached), for the training log (`FusionTrainer.log`)."""

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
    if kind not in ("ce", "kl"):
        raise ValueError(f"unknown fusion loss {kind!r} (ce or kl)")
    keep = labels != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:  # nothing to learn in this batch: a zero that still reaches every parameter's graph
        zero = logits.sum() * 0.0
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    # Every row goes through (a view, no copy), unlabelled ones with weight 0: selecting the labelled rows
    # first costs a copy forward and a scatter into zeros backward, slower than the rows it saves.
    z = logits.reshape(-1, logits.shape[-1])
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    keep = keep.reshape(-1, 1)
    gold = labels.reshape(-1, 1).long().clamp(min=0)
    if lambda_ == 1.0:
        loss, _ = _sparse_ce(z, gold, keep.to(z.dtype) / count)
        return LossParts(loss, loss.detach(), torch.zeros_like(loss).detach(), count)
    if target_ids is None or target_probs is None:
        raise ValueError("the fusion term needs target_ids and target_probs (lambda < 1)")
    ids = target_ids.reshape(-1, target_ids.shape[-1]).long()
    q = torch.where((ids >= 0) & keep, target_probs.reshape(ids.shape).to(z.dtype), 0.0)
    has_teacher = q.sum(dim=1, keepdim=True) > 0
    # row weights of -log p(column): lambda on the gold token, (1 - lambda) * q on the K target ids, and
    # (1 - lambda) on the gold token too where there is no teacher distribution (the one-hot fallback)
    on_gold = torch.where(keep, lambda_ + (1.0 - lambda_) * (~has_teacher).to(z.dtype), 0.0)
    weights = torch.cat([on_gold, (1.0 - lambda_) * q], dim=1) / count
    loss, logp = _sparse_ce(z, torch.cat([gold, ids.clamp(min=0)], dim=1), weights)
    with torch.no_grad():
        rows = keep.squeeze(1)
        clm_rows = -logp[rows, 0]
        fusion_rows = torch.where(has_teacher[rows, 0], -(q[rows] * logp[rows, 1:]).sum(1), clm_rows)
        neg_entropy = torch.where(q > 0, q * torch.log(q.clamp(min=1e-30)), 0.0).sum(1)  # 0 off-label
        if kind == "kl":
            fusion_rows = fusion_rows + neg_entropy[rows]
        clm, fusion = clm_rows.mean(), fusion_rows.mean()
    if kind == "kl":  # KL = CE - H(q): a constant shift of the value, the gradient is the same
        loss = loss + (1.0 - lambda_) * neg_entropy.sum() / count
    return LossParts(loss, clm.detach(), fusion.detach(), count)


class _SparseCrossEntropy(torch.autograd.Function):
    """sum_r sum_c w[r, c] * -log softmax(z[r])[cols[r, c]], with a gradient that never leaves [N, V] twice.

    Autograd through logsumexp + gather would build one dense gradient for the normaliser and another
    (a scatter into zeros) for the gather, then add them. Here the backward writes softmax(z) * sum_c w
    once and scatter-adds -w into it in place: one [N, V] buffer, the same as plain cross-entropy needs.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, cols: torch.Tensor, w: torch.Tensor):  # type: ignore[override]
        logp = torch.log_softmax(z, dim=-1)  # one fused pass; kept for the backward instead of z
        picked = logp.gather(1, cols)
        ctx.save_for_backward(logp, cols, w)
        ctx.mark_non_differentiable(picked)
        return -(w * picked).sum(), picked

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _picked: torch.Tensor):  # type: ignore[override]
        logp, cols, w = ctx.saved_tensors
        gw = w * grad_loss
        grad = logp.exp()
        grad.mul_(gw.sum(dim=1, keepdim=True))
        grad.scatter_add_(1, cols, -gw)
        return grad, None, None


def _sparse_ce(z: torch.Tensor, cols: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of w * -log p(cols), the log-probs at cols without gradient)."""
    return _SparseCrossEntropy.apply(z, cols, w)
