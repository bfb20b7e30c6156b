"""The sparse fusion loss against a dense [N, vocab] reference (forward and gradient), and lambda = 1."""

from __future__ import annotations

import pytest
import torch

from fusemerge.fuse.loss import IGNORE_INDEX, fusion_loss


def batch(seed: int = 0, *, b: int = 3, length: int = 7, vocab: int = 40, k: int = 5):
    """Random logits, labels with ignored positions, unique target ids with empty slots and empty rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, vocab, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (b, length), generator=gen)
    labels[:, :2] = IGNORE_INDEX  # instruction tokens
    labels[1, -1] = IGNORE_INDEX
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(b * length)]).view(
        b, length, k
    )
    probs = torch.softmax(torch.randn(b, length, k, generator=gen, dtype=torch.float64), dim=-1)
    ids[0, 3, 3:] = -1  # fewer than K ids
    probs[0, 3, 3:] = 0.0
    probs[0, 3] /= probs[0, 3].sum()
    ids[2, 4] = -1  # no teacher distribution here: gold one-hot
    probs[2, 4] = 0.0
    return logits, labels, ids, probs


def dense_reference(logits, labels, ids, probs, lambda_, kind):
    """What the reference code does: scatter q into a dense [N, vocab] target, then full log_softmax."""
    keep = labels != IGNORE_INDEX
    z, gold = logits[keep], labels[keep]
    logp = torch.log_softmax(z, dim=-1)
    q = torch.zeros_like(z).scatter_add_(
        1, ids[keep].clamp(min=0), torch.where(ids[keep] >= 0, probs[keep], 0)
    )
    none = q.sum(-1) == 0
    q[none] = torch.nn.functional.one_hot(gold[none], z.shape[-1]).to(q.dtype)
    rows = -(q * logp).sum(-1)
    if kind == "kl":
        rows = rows + torch.where(q > 0, q * torch.log(q.clamp(min=1e-300)), 0.0).sum(-1)
    clm = torch.nn.functional.cross_entropy(z, gold)
    return lambda_ * clm + (1 - lambda_) * rows.mean()


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("lambda_", [0.0, 0.9, 0.5, 1.0])
def test_sparse_loss_equals_dense_reference_forward_and_gradient(kind, lambda_):
    logits, labels, ids, probs = batch()
    sparse_in = logits.clone().requires_grad_(True)
    dense_in = logits.clone().requires_grad_(True)
    sparse = fusion_loss(sparse_in, labels, ids, probs, lambda_=lambda_, kind=kind).loss
    dense = dense_reference(dense_in, labels, ids, probs, lambda_, kind)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(sparse_in.grad, dense_in.grad, rtol=1e-10, atol=1e-12)
    assert sparse_in.grad[labels == IGNORE_INDEX].abs().max() == 0  # instruction tokens get nothing


def test_kl_and_ce_differ_by_the_teacher_entropy_only():
    logits, labels, ids, probs = batch(1)
    ce = fusion_loss(logits, labels, ids, probs, lambda_=0.0, kind="ce").loss
    kl = fusion_loss(logits, labels, ids, probs, lambda_=0.0, kind="kl").loss
    assert kl < ce
    # the student equal to the teacher on its listed ids (and ~0 elsewhere) gives KL ~ 0
    keep = labels != IGNORE_INDEX
    student = torch.full_like(logits, -1e4)
    student.scatter_(2, ids.clamp(min=0), torch.where(ids >= 0, probs.clamp(min=1e-30).log(), -1e4))
    student[~keep] = 0.0
    rows_with_teacher = labels.clone()
    rows_with_teacher[probs.sum(-1) == 0] = IGNORE_INDEX
    kl_zero = fusion_loss(student, rows_with_teacher, ids, probs, lambda_=0.0, kind="kl").loss
    assert kl_zero.abs() < 1e-6

    # ce - kl is the mean teacher entropy H(q) over the labelled rows (0 on rows without a teacher),
    # times (1 - lambda); the gradients are identical.
    q = torch.where(ids >= 0, probs, 0.0)
    entropy = -torch.where(q > 0, q * torch.log(q.clamp(min=1e-300)), 0.0).sum(-1)
    mean_entropy = entropy[keep].mean()
    assert float(mean_entropy) > 0.1
    torch.testing.assert_close(ce - kl, mean_entropy, rtol=1e-12, atol=1e-12)
    for lambda_ in (0.5, 0.9):
        grads = []
        for kind in ("ce", "kl"):
            x = logits.clone().requires_grad_(True)
            loss = fusion_loss(x, labels, ids, probs, lambda_=lambda_, kind=kind).loss
            loss.backward()
            grads.append((loss.detach(), x.grad))
        (ce_l, ce_g), (kl_l, kl_g) = grads
        torch.testing.assert_close(ce_l - kl_l, (1 - lambda_) * mean_entropy, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ce_g, kl_g, rtol=0, atol=1e-15)


@pytest.mark.parametrize("upstream", [0.25, 1 / 32, -3.0])
def test_gradient_scales_with_the_upstream_gradient(upstream):
    """Training backpropagates loss / gradient_accumulation, so the custom backward's upstream gradient
    is not 1: the sparse gradient must be the dense reference's times that factor."""
    logits, labels, ids, probs = batch(3)
    sparse_in = logits.clone().requires_grad_(True)
    dense_in = logits.clone().requires_grad_(True)
    (fusion_loss(sparse_in, labels, ids, probs, lambda_=0.5, kind="ce").loss * upstream).backward()
    (dense_reference(dense_in, labels, ids, probs, 0.5, "ce") * upstream).backward()
    torch.testing.assert_close(sparse_in.grad, dense_in.grad, rtol=1e-10, atol=1e-14)
    assert float(sparse_in.grad.abs().max()) > 0


def test_lambda_one_is_exactly_the_clm_loss():
    logits, labels, ids, probs = batch(2)
    a = fusion_loss(logits, labels, ids, probs, lambda_=1.0).loss
    b = fusion_loss(
        logits, labels, torch.randint(0, 40, ids.shape), torch.rand(probs.shape), lambda_=1.0
    ).loss
    c = fusion_loss(logits, labels, None, None, lambda_=1.0).loss
    assert torch.equal(a, b) and torch.equal(a, c)
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(
        a, torch.nn.functional.cross_entropy(logits[keep], labels[keep]), rtol=1e-12, atol=0
    )


def test_lambda_one_matches_the_models_own_causal_lm_loss(tiny_models):
    """Against transformers' loss on a real (tiny) model: same value from the same logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 9), generator=gen)
    hf_labels = input_ids.clone()
    hf_labels[:, :3] = IGNORE_INDEX
    out = model(input_ids=input_ids, labels=hf_labels)
    shifted = torch.full_like(hf_labels, IGNORE_INDEX)
    shifted[:, :-1] = hf_labels[:, 1:]
    ours = fusion_loss(out.logits, shifted, None, None, lambda_=1.0).loss
    torch.testing.assert_close(ours, out.loss, rtol=1e-6, atol=1e-6)


def test_no_labelled_position_gives_a_zero_that_still_backpropagates():
    logits, labels, ids, probs = batch(3)
    logits.requires_grad_(True)
    parts = fusion_loss(logits, torch.full_like(labels, IGNORE_INDEX), ids, probs, lambda_=0.9)
    parts.loss.backward()
    assert parts.loss.item() == 0.0 and parts.tokens == 0 and logits.grad.abs().max() == 0


def test_bfloat16_logits_are_upcast():
    logits, labels, ids, probs = batch(4)
    low = fusion_loss(logits.bfloat16(), labels, ids, probs.float(), lambda_=0.9).loss
    assert low.dtype == torch.float32
    high = fusion_loss(logits.bfloat16().double(), labels, ids, probs, lambda_=0.9).loss
    torch.testing.assert_close(low, high.float(), rtol=1e-5, atol=1e-5)
