"""The loss hook of the preference stage: TRL's DPOTrainer with a loss from `PREFERENCE_LOSSES`.

`dpo` and `ln_dpo` need none of this (TRL computes them itself). Every other registered loss, WRPO among
them, replaces only `compute_loss`, as `fusemerge.fuse.train.FusionTrainer` does for the fusion loss: the
reference forward (a frozen copy, or the adapters switched off), the tokenization and the batching stay
TRL's. WRPO's third response per pair, the pivot's own best answer (`chosen_target`), is tokenized by
TRL's own preparation as if it were the chosen one, and appended to TRL's batch by `TargetCollator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from fusemerge.fuse.implicit.losses import PREFERENCE_LOSSES, TARGET_LOSSES, PreferenceLogps, fusion_alpha

TARGET_IDS = "chosen_target_ids"


@dataclass
class TargetCollator(DataCollatorForPreference):
    """TRL's preference batch [chosen; rejected] with the target-chosen responses appended: [.; .; target]."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        pairs = super().torch_call(examples)
        as_chosen = [
            {"prompt_ids": e["prompt_ids"], "chosen_ids": e[TARGET_IDS], "rejected_ids": []} for e in examples
        ]
        targets = super().torch_call(as_chosen)
        n, width = len(examples), max(pairs["input_ids"].size(1), targets["input_ids"].size(1))
        out = {}
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("completion_mask", 0)):
            a, b = pairs[key], targets[key][:n]
            out[key] = torch.cat(
                [F.pad(a, (0, width - a.size(1)), value=fill), F.pad(b, (0, width - b.size(1)), value=fill)]
            )
        return out


class ClosedTurnsTrainer(DPOTrainer):
    """TRL's DPOTrainer whose completions end on the stop token when the chat template writes none.

    TRL adds the end-of-sequence token to plain-text completions only; a conversational one ends with
    whatever the template writes after the content, which for a plain-text template (the demo's blank
    line) is no stop token at all (see `fusemerge.fuse.implicit.turns`).
    """

    def __init__(self, *args: Any, turn_eos_id: int | None = None, **kwargs: Any) -> None:
        self.turn_eos_id = turn_eos_id  # set before TRL's __init__ prepares the dataset
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        eos = self.turn_eos_id
        if eos is None:
            return prepared

        def close(example: dict[str, Any]) -> dict[str, Any]:
            return {
                key: example[key] + [eos]
                for key in ("chosen_ids", "rejected_ids")
                if not example[key] or example[key][-1] != eos
            }

        return prepared.map(close)


class RegisteredLossTrainer(ClosedTurnsTrainer):
    """TRL's DPOTrainer with a loss from `PREFERENCE_LOSSES` (WRPO, or any loss TRL does not have).

    Only the loss changes: the reference forward (a frozen copy, or the adapters switched off), the
    tokenization and the batching are TRL's. For a loss in `TARGET_LOSSES` the dataset's
    `chosen_target` responses are tokenized by TRL's own preparation, as if they were the chosen ones.
    """

    def __init__(self, *args: Any, loss_name: str, alpha: float, alpha_schedule: str, **kwargs: Any) -> None:
        self.loss_name = loss_name
        self.loss_fn = PREFERENCE_LOSSES.get(loss_name, key="implicit.preference.loss").fn
        self.needs_target = loss_name in TARGET_LOSSES
        self.final_alpha = alpha
        self.alpha_schedule = alpha_schedule
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if "chosen_target" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        indexed = dataset.add_column("pair_index", list(range(len(dataset))))
        pairs = super()._prepare_dataset(
            indexed.remove_columns("chosen_target"), processing_class, args, dataset_name
        )
        as_chosen = indexed.remove_columns("chosen").rename_column("chosen_target", "chosen")
        targets = super()._prepare_dataset(as_chosen, processing_class, args, f"{dataset_name} target-chosen")
        full = {
            i: p + c
            for i, p, c in zip(
                targets["pair_index"], targets["prompt_ids"], targets["chosen_ids"], strict=True
            )
        }

        def add_target(example: dict[str, Any]) -> dict[str, Any]:
            seq, prompt = full.get(example["pair_index"], []), example["prompt_ids"]
            return {TARGET_IDS: seq[len(prompt) :] if seq[: len(prompt)] == prompt else []}

        return pairs.map(add_target).filter(lambda e: len(e[TARGET_IDS]) > 0)

    def alpha(self) -> float:
        """The fusion coefficient at the current optimizer step."""
        return fusion_alpha(
            alpha=self.final_alpha,
            schedule=self.alpha_schedule,
            step=self.state.global_step,
            max_steps=self.state.max_steps,
        )

    def sequence_logps(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(policy, reference) summed completion log-probs per row of the batch, and completion lengths."""
        import torch
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        kwargs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "use_cache": False,
        }
        shift = mask[:, 1:]

        def summed(outputs: Any) -> Any:
            return (outputs.log_probs[:, -shift.size(1) :] * shift).sum(dim=1)

        policy = summed(model(**kwargs, labels=labels, fused_lm_head=True))
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
        ):
            if is_peft_model(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    reference = summed(self.model(**kwargs, labels=labels, fused_lm_head=True))
            else:
                reference = summed(self.ref_model(**kwargs, labels=labels, fused_lm_head=True))
        return policy, reference, shift.sum(dim=1)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        policy, reference, tokens = self.sequence_logps(model, inputs)
        parts = 3 if self.needs_target else 2
        p, r, t = policy.chunk(parts), reference.chunk(parts), tokens.chunk(parts)
        logps = PreferenceLogps(
            chosen=p[0], rejected=p[1], ref_chosen=r[0], ref_rejected=r[1], chosen_tokens=t[0], rejected_tokens=t[1],
            target=p[2] if self.needs_target else None,
            ref_target=r[2] if self.needs_target else None,
            target_tokens=t[2] if self.needs_target else None,
        )  # fmt: skip
        alpha = self.alpha()
        loss = self.loss_fn(logps, beta=self.beta, alpha=alpha).mean()
        mode = "train" if self.model.training else "eval"
        chosen_reward = self.beta * (logps.chosen - logps.ref_chosen).detach()
        rejected_reward = self.beta * (logps.rejected - logps.ref_rejected).detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_reward).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_reward).mean().item())
        margins = self.accelerator.gather(chosen_reward - rejected_reward)
        metrics["rewards/margins"].append(margins.mean().item())
        metrics["rewards/accuracies"].append((margins > 0).float().mean().item())
        if self.needs_target:
            metrics["fusion_alpha"].append(alpha)
        return (loss, {}) if return_outputs else loss
