"""`FusionTrainer`: transformers' Trainer with the FuseChat loss.

Why the Trainer: checkpoints, resume, schedules, gradient accumulation, mixed precision and accelerate
(DDP, DeepSpeed ZeRO, FSDP) come for free; the only thing it does not know is our loss, so `FusionTrainer`
overrides `compute_loss`. The model is always called through its (possibly wrapped) forward, so
sharding wrappers see an ordinary step.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from fusemerge.fuse.loss import fusion_loss


class FusionTrainer(Trainer):
    """transformers' Trainer with the sparse fusion loss (fusemerge.fuse.loss) as its loss."""

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, lambda_: float = 0.9, loss_kind: str = "ce", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Releases without `loss_is_scaled_for_ga` (5.17, for one) skip the division by the accumulation
        # steps when the model's forward takes **kwargs; our loss never sees num_items_in_batch, so say no.
        self.model_accepts_loss_kwargs = False
        self.lambda_ = lambda_
        self.loss_kind = loss_kind

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        parts = fusion_loss(
            outputs.logits,
            inputs["labels"],
            inputs.get("target_ids"),
            inputs.get("target_probs"),
            lambda_=self.lambda_,
            kind=self.loss_kind,  # type: ignore[arg-type]
        )
        return (parts.loss, outputs) if return_outputs else parts.loss
