"""The preference losses of implicit fusion, one registered function each (`PREFERENCE_LOSSES`).

Every loss reads the same per-pair numbers: the summed log-probability of each response under the
policy and under the frozen reference (the SFT target), and its length in tokens; it returns one loss
per pair. With the log-ratio of a response `r(y) = log pi(y|x) - log pi_ref(y|x)`:

- `dpo`: `-log sigmoid(beta * (r(y_w) - r(y_l)))` (Rafailov et al. 2023; FuseChat-3.0 for Qwen and
  Gemma targets, beta 0.01).
- `ln_dpo`: length-normalised DPO, the log-ratios averaged per token,
  `-log sigmoid(beta * (r(y_w) / |y_w| - r(y_l) / |y_l|))` (FuseChat-3.0 for Llama targets, beta 10).
- `wrpo`: Weighted-Reward Preference Optimization (Yang et al., ICLR 2025): the chosen reward is the
  source-chosen and the target-chosen (the pivot's own best response) mixed by the fusion coefficient
  alpha, `-log sigmoid(beta * (alpha * r(y_ws) + (1 - alpha) * r(y_wt) - r(y_l)))`; alpha grows from 0 to
  its final value over training (`fusion_alpha`), so the pivot starts from responses it could have
  written and moves towards the sources'.

`dpo` and `ln_dpo` train with TRL's own loss (`TRL_LOSS_TYPES`: `sigmoid`, `sigmoid_norm`; the tests check
that it equals the function here); every other registered loss runs through the trainer's loss hook
(`fusemerge.fuse.implicit.loss_trainer.RegisteredLossTrainer`), so a new loss is one function here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fusemerge.errors import FusemergeError
from fusemerge.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-pair tensors [batch]: summed log-probs of each response (policy, reference) and token counts."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    target: Tensor | None = None  # WRPO: the pivot's own best response
    ref_target: Tensor | None = None
    target_tokens: Tensor | None = None


PreferenceLoss = Callable[..., "Tensor"]
PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")
# the losses TRL's DPOTrainer computes itself, by its loss_type name
TRL_LOSS_TYPES = {"dpo": "sigmoid", "ln_dpo": "sigmoid_norm"}
# the losses that need the pivot's own best response (`chosen_target`) in every pair
TARGET_LOSSES = frozenset({"wrpo"})


@PREFERENCE_LOSSES.register("dpo", pretty_name="DPO", reference_url="https://arxiv.org/abs/2305.18290")
def dpo_loss(logps: PreferenceLogps, *, beta: float, alpha: float = 1.0) -> Tensor:
    """Direct Preference Optimization: the margin of summed log-ratios (alpha is unused).

    Args:
        logps: the per-pair log-probabilities and lengths.
        beta: the strength of the implicit KL constraint (`implicit.preference.beta`).
        alpha: WRPO's fusion coefficient at this step (`fusion_alpha`); ignored by the other losses.
    """
    import torch.nn.functional as F

    margin = (logps.chosen - logps.ref_chosen) - (logps.rejected - logps.ref_rejected)
    return -F.logsigmoid(beta * margin)


@PREFERENCE_LOSSES.register(
    "ln_dpo", pretty_name="length-normalised DPO", reference_url="https://arxiv.org/abs/2503.04222"
)
def ln_dpo_loss(logps: PreferenceLogps, *, beta: float, alpha: float = 1.0) -> Tensor:
    """DPO on per-token log-ratios, so that long responses do not win by length (alpha is unused).

    Args:
        logps: the per-pair log-probabilities and lengths.
        beta: the strength of the implicit KL constraint (`implicit.preference.beta`).
        alpha: WRPO's fusion coefficient at this step (`fusion_alpha`); ignored by the other losses.
    """
    import torch.nn.functional as F

    chosen = (logps.chosen - logps.ref_chosen) / logps.chosen_tokens.clamp(min=1)
    rejected = (logps.rejected - logps.ref_rejected) / logps.rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * (chosen - rejected))


@PREFERENCE_LOSSES.register("wrpo", pretty_name="WRPO", reference_url="https://arxiv.org/abs/2412.03187")
def wrpo_loss(logps: PreferenceLogps, *, beta: float, alpha: float) -> Tensor:
    """WRPO: the chosen reward is `alpha` source-chosen + `1 - alpha` target-chosen, against the rejected.

    Args:
        logps: the per-pair log-probabilities and lengths.
        beta: the strength of the implicit KL constraint (`implicit.preference.beta`).
        alpha: WRPO's fusion coefficient at this step (`fusion_alpha`); ignored by the other losses.
    """
    import torch.nn.functional as F

    if logps.target is None or logps.ref_target is None:
        raise FusemergeError("wrpo needs chosen_target responses", key="implicit.preference.loss")
    chosen = alpha * (logps.chosen - logps.ref_chosen) + (1.0 - alpha) * (logps.target - logps.ref_target)
    return -F.logsigmoid(beta * (chosen - (logps.rejected - logps.ref_rejected)))


def fusion_alpha(*, alpha: float, schedule: str, step: int, max_steps: int) -> float:
    """WRPO's fusion coefficient at optimizer step `step` of `max_steps`.

    Args:
        alpha: its final value (`implicit.preference.alpha`).
        schedule: `linear` (0 at the first step, `alpha` at the last: the paper's progressive adaptation)
            or `constant`.
        step: completed optimizer steps.
        max_steps: the run's total optimizer steps.
    """
    if schedule == "constant":
        return alpha
    if schedule == "linear":
        return alpha * min(step / max(max_steps, 1), 1.0)
    raise FusemergeError(f"unknown alpha schedule '{schedule}'", key="implicit.preference.alpha_schedule")
