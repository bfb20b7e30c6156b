"""The preference losses: the registered functions against values computed by hand, and the trainer's loss
(TRL's own for dpo / ln_dpo, the loss hook for wrpo) against those functions on log-probs computed here."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from train_helpers import make_recipe, preference_rows
from transformers import AutoModelForCausalLM

from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.datasets import preference_pair
from fusemerge.fuse.implicit.losses import (
    PREFERENCE_LOSSES,
    TARGET_LOSSES,
    PreferenceLogps,
    fusion_alpha,
)
from fusemerge.fuse.implicit.preference import (
    build_preference_trainer,
    policy_tokenizer,
    preference_dataset,
    preference_student,
)
from fusemerge.fuse.implicit.spec import PreferenceSpec

# two pairs; policy and reference summed log-probs, response lengths in tokens
CHOSEN, REJECTED, TARGET = [-10.0, -20.0], [-14.0, -18.0], [-9.0, -30.0]
REF_CHOSEN, REF_REJECTED, REF_TARGET = [-11.0, -19.0], [-12.0, -18.5], [-9.5, -29.0]
CHOSEN_TOKENS, REJECTED_TOKENS, TARGET_TOKENS = [5, 10], [8, 4], [6, 12]


def logps() -> PreferenceLogps:
    t = torch.tensor
    return PreferenceLogps(
        chosen=t(CHOSEN),
        rejected=t(REJECTED),
        ref_chosen=t(REF_CHOSEN),
        ref_rejected=t(REF_REJECTED),
        chosen_tokens=t(CHOSEN_TOKENS),
        rejected_tokens=t(REJECTED_TOKENS),
        target=t(TARGET),
        ref_target=t(REF_TARGET),
        target_tokens=t(TARGET_TOKENS),
    )


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


def test_dpo_by_hand():
    beta = 0.5
    # pair 0: (−10 − −11) − (−14 − −12) = 1 + 2 = 3; pair 1: (−20 − −19) − (−18 − −18.5) = −1 − 0.5 = −1.5
    expected = [softplus_neg(beta * 3.0), softplus_neg(beta * -1.5)]
    got = PREFERENCE_LOSSES.get("dpo").fn(logps(), beta=beta)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_length_normalised_dpo_by_hand():
    beta = 10.0
    # pair 0: 1/5 − (−2)/8 = 0.45; pair 1: −1/10 − 0.5/4 = −0.225
    expected = [softplus_neg(beta * 0.45), softplus_neg(beta * -0.225)]
    got = PREFERENCE_LOSSES.get("ln_dpo").fn(logps(), beta=beta)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_wrpo_by_hand_and_its_limits():
    beta, alpha = 0.5, 0.25
    # pair 0: 0.25 * 1 + 0.75 * 0.5 − (−2) = 2.625; pair 1: 0.25 * (−1) + 0.75 * (−1) − 0.5 = −1.5
    expected = [softplus_neg(beta * 2.625), softplus_neg(beta * -1.5)]
    wrpo = PREFERENCE_LOSSES.get("wrpo").fn
    assert wrpo(logps(), beta=beta, alpha=alpha).tolist() == pytest.approx(expected, rel=1e-6)
    # alpha 1: only the source-chosen response counts, i.e. DPO
    assert torch.allclose(
        wrpo(logps(), beta=beta, alpha=1.0), PREFERENCE_LOSSES.get("dpo").fn(logps(), beta=beta)
    )
    # alpha 0: DPO with the target-chosen response as the chosen one
    both = logps()
    swapped = PreferenceLogps(
        both.target,
        both.rejected,
        both.ref_target,
        both.ref_rejected,
        both.target_tokens,
        both.rejected_tokens,
    )
    assert torch.allclose(
        wrpo(both, beta=beta, alpha=0.0), PREFERENCE_LOSSES.get("dpo").fn(swapped, beta=beta)
    )
    with pytest.raises(FusemergeError, match="wrpo needs chosen_target"):
        wrpo(swapped, beta=beta, alpha=0.5)


def test_fusion_alpha_schedules():
    linear = [fusion_alpha(alpha=0.4, schedule="linear", step=s, max_steps=4) for s in range(6)]
    assert linear == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert fusion_alpha(alpha=0.4, schedule="constant", step=0, max_steps=4) == 0.4
    with pytest.raises(FusemergeError, match="alpha_schedule"):
        fusion_alpha(alpha=0.4, schedule="cosine", step=0, max_steps=4)


def test_registry_covers_exactly_the_recipe_losses():
    allowed = typing.get_args(PreferenceSpec.model_fields["loss"].annotation)
    assert PREFERENCE_LOSSES.names() == sorted(allowed)
    with pytest.raises(FusemergeError, match="unknown preference loss 'ipo'"):
        PREFERENCE_LOSSES.get("ipo")


def test_wrpo_leaves_out_pairs_without_a_target_and_refuses_none():
    rows = preference_rows(3)
    rows[1] = {k: v for k, v in rows[1].items() if k != "chosen_target"}
    pairs = [preference_pair(record=r, line=i + 1) for i, r in enumerate(rows)]
    dataset, left_out, _ = preference_dataset(pairs=pairs, loss="wrpo")
    assert (len(dataset), left_out) == (2, 1)
    dataset, left_out, _ = preference_dataset(pairs=pairs, loss="dpo")
    assert (len(dataset), left_out, "chosen_target" in dataset.column_names) == (3, 0, False)
    with pytest.raises(FusemergeError, match="key 'implicit.preference.loss': wrpo needs chosen_target"):
        preference_dataset(pairs=[pairs[1]], loss="wrpo")


# ---------------------------------------------------------------- the trainer's loss


def summed_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs per row from plain logits (not TRL's fused head), and lengths."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    per_token = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:]
    return (per_token * mask).sum(dim=1), mask.sum(dim=1)


def plain_text(row: dict) -> dict:
    """The same pair in TRL's standard format: text the user rendered, no chat template."""
    return {
        k: f"Q: {v[0]['content']}\nA:" if k == "prompt" else " " + v[0]["content"] for k, v in row.items()
    }


@pytest.mark.parametrize(
    ("loss", "mode", "shape"),
    [
        ("dpo", "full", "chat"),
        ("ln_dpo", "full", "chat"),
        ("wrpo", "full", "chat"),
        ("wrpo", "lora", "chat"),
        ("ln_dpo", "full", "text"),
    ],
)
def test_trainer_loss_equals_the_registered_function(tmp_path, tiny_models, loss, mode, shape):
    policy = str(tiny_models["gpt2"])
    recipe = make_recipe(policy, mode=mode, loss=loss, beta=0.7, alpha=0.8)
    rows = [plain_text(r) if shape == "text" else r for r in preference_rows(4)]
    pairs = [preference_pair(record=r, line=i + 1) for i, r in enumerate(rows)]
    assert all(p.conversational == (shape == "chat") for p in pairs)
    dataset, _, _ = preference_dataset(pairs=pairs, loss=loss)
    trainer = build_preference_trainer(
        recipe=recipe,
        student=preference_student(recipe=recipe, policy=policy),
        tokenizer=policy_tokenizer(recipe=recipe, policy=policy),
        dataset=dataset,
        checkpoints=tmp_path / "ck",
        progress=False,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from its frozen reference, or every log-ratio is 0
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    trainer.state.global_step, trainer.state.max_steps = 1, 4  # WRPO's alpha: 0.8 * 1/4
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)

    reference = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    pol, tokens = summed_logps(trainer.model, batch)
    ref, _ = summed_logps(reference, batch)
    parts = 3 if loss in TARGET_LOSSES else 2
    p, r, t = pol.chunk(parts), ref.chunk(parts), tokens.chunk(parts)
    extra = {"target": p[2], "ref_target": r[2], "target_tokens": t[2]} if parts == 3 else {}
    logps_ = PreferenceLogps(p[0], p[1], r[0], r[1], t[0], t[1], **extra)
    expected = PREFERENCE_LOSSES.get(loss).fn(logps_, beta=0.7, alpha=0.2).mean()
    assert not torch.allclose(pol, ref)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)

    if parts == 3:  # the third part of a WRPO batch is each pair's target-chosen response
        tok = trainer.processing_class
        n = batch["input_ids"].size(0) // 3
        for row in range(n):
            ids = batch["input_ids"][2 * n + row][batch["completion_mask"][2 * n + row].bool()]
            chosen = batch["input_ids"][row][batch["completion_mask"][row].bool()]
            assert " plus " in tok.decode(ids) and "The sum is" in tok.decode(chosen)
