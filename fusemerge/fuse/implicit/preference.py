"""The `preference` step of implicit fusion: the SFT target trained on preference pairs, with TRL's DPOTrainer.

    from fusemerge.fuse.implicit.datasets import read_preference_data
    from fusemerge.fuse.implicit.preference import run_preference
    pairs = read_preference_data(spec=DataFileSpec(path="fused/work/implicit/preference.jsonl"))
    run_preference(recipe=recipe, pairs=pairs, policy="fused/llama-sft", out=Path("fused/llama-dpo"),
                   checkpoints=Path("fused/work/implicit/train/preference"))

FuseChat-3.0's second stage (1 epoch, lr 3e-7 to 1e-6; length-normalised DPO with beta 10 for Llama,
plain DPO with beta 0.01 for Qwen and Gemma), or WRPO. The losses are `fusemerge.fuse.implicit.losses`.

The frozen reference is the policy as it starts, i.e. the SFT target, by TRL's own reference handling: for
full fine-tuning a second copy loaded from the same folder (twice the weights in memory, no optimizer
state for it), for LoRA the same weights with the adapters switched off (no second copy). `dpo` and
`ln_dpo` are TRL's `sigmoid` and `sigmoid_norm` losses unchanged; any other registered loss, WRPO among
them, replaces only the loss: `RegisteredLossTrainer.compute_loss`, with WRPO's third response (the pivot's
own best answer) tokenized by TRL's own preparation and batched by TRL's own collator.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.datasets import PreferencePair
from fusemerge.fuse.implicit.losses import (
    PREFERENCE_LOSSES,
    TARGET_LOSSES,
    TRL_LOSS_TYPES,
    PreferenceLogps,
    fusion_alpha,
)
from fusemerge.fuse.implicit.target import (
    ImplicitRecipe,
    Student,
    implicit_card,
    last_complete_checkpoint,
    model_dtype,
    read_stamp,
    save_target,
    trl_config,
)
from fusemerge.fuse.recipe import ModelSpec

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


class RegisteredLossTrainer(DPOTrainer):
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


def preference_dataset(*, pairs: Sequence[PreferencePair], loss: str) -> tuple[Any, int, str]:
    """The pairs as the `datasets.Dataset` DPOTrainer reads; pairs a loss cannot use are left out.

    Args:
        pairs: normalised preference pairs (`read_preference_data`).
        loss: the preference loss; for one in `TARGET_LOSSES` a pair without `chosen_target` is left out.

    Returns:
        (dataset, how many pairs were left out, sha256 fingerprint of the rows).
    """
    from datasets import Dataset

    with_target = loss in TARGET_LOSSES
    rows = [
        p.as_row(with_target=with_target) for p in pairs if not with_target or p.chosen_target is not None
    ]
    if not rows:
        raise FusemergeError(
            f"{loss} needs chosen_target (the pivot's own best response) and no pair has one",
            key="implicit.preference.loss",
        )
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return Dataset.from_list(rows), len(pairs) - len(rows), digest


def preference_student(*, recipe: ImplicitRecipe, policy: str) -> Student:
    """The model the preference stage trains (the SFT target) and its settings: `implicit.preference` over
    `training` (mode, precision, LoRA shape, seed, checkpointing stay as `training` says).

    Args:
        recipe: the implicit recipe (`training`, `implicit.preference`, `pivot.trust_remote_code`).
        policy: the model folder or Hub id of the policy.
    """
    pref, training = recipe.implicit.preference, recipe.training
    updates = {
        "learning_rate": pref.learning_rate,
        "epochs": pref.epochs,
        "batch_size": pref.batch_size or training.batch_size,
        "gradient_accumulation": pref.gradient_accumulation or training.gradient_accumulation,
        "max_steps": pref.max_steps,
        "group_by_length": False,  # TRL's preference rows have no `input_ids` column to group by
    }
    model = ModelSpec(model=policy, trust_remote_code=recipe.pivot.trust_remote_code)
    return Student(pivot=model, training=training.model_copy(update=updates))


def policy_tokenizer(*, recipe: ImplicitRecipe, policy: str) -> Any:
    """The policy's tokenizer, carrying the chat template the recipe renders with (the pivot's own, a
    built-in or a file): TRL's DPOTrainer renders the pairs with whatever template the tokenizer holds.

    Args:
        recipe: the implicit recipe (`chat_template`, `pivot.trust_remote_code`).
        policy: the model folder or Hub id of the policy.
    """
    from fusemerge.fuse.data import resolve_chat_template
    from fusemerge.fuse.teacher import load_teacher_tokenizer

    tokenizer = load_teacher_tokenizer(policy, trust_remote_code=recipe.pivot.trust_remote_code)
    tokenizer.chat_template = resolve_chat_template(recipe.chat_template, tokenizer)
    return tokenizer


def build_preference_trainer(
    *,
    recipe: ImplicitRecipe,
    student: Student,
    tokenizer: Any,
    dataset: Any,
    checkpoints: Path,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> DPOTrainer:
    """TRL's DPOTrainer for `dpo` / `ln_dpo`, `RegisteredLossTrainer` for the other losses; nothing trained yet.

    Args:
        recipe: the implicit recipe (`implicit.preference`: loss, beta, alpha, max_length).
        student: the policy and its training settings (`preference_student`).
        tokenizer: the policy's tokenizer, carrying the chat template to render the pairs with.
        dataset: the pairs (`preference_dataset`).
        checkpoints: the Trainer's output folder.
        progress: the Trainer's progress bar.
        callbacks: extra transformers TrainerCallbacks.
    """
    from transformers import set_seed
    from trl import DPOConfig

    from fusemerge.fuse.train import has_cuda, load_student

    pref = recipe.implicit.preference
    cuda = has_cuda()
    set_seed(student.training.seed)  # LoRA adapters are drawn now: a rerun must draw the same ones
    model = load_student(student, cuda=cuda)  # type: ignore[arg-type]
    config = trl_config(
        config_cls=DPOConfig,
        student=student,
        checkpoints=checkpoints,
        cuda=cuda,
        progress=progress,
        beta=pref.beta,
        loss_type=[TRL_LOSS_TYPES.get(pref.loss, "sigmoid")],
        max_length=pref.max_length,
    )
    common = {
        "model": model,
        "args": config,
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "callbacks": list(callbacks),
    }
    if pref.loss in TRL_LOSS_TYPES:
        trainer: DPOTrainer = DPOTrainer(**common)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = TargetCollator(
            pad_token_id=pad, max_length=config.max_length, pad_to_multiple_of=config.pad_to_multiple_of
        )
        trainer = RegisteredLossTrainer(
            **common,
            data_collator=collator if pref.loss in TARGET_LOSSES else None,
            loss_name=pref.loss,
            alpha=pref.alpha,
            alpha_schedule=pref.alpha_schedule,
        )
    return trainer


def run_preference(
    *,
    recipe: ImplicitRecipe,
    pairs: Sequence[PreferencePair],
    out: Path,
    checkpoints: Path,
    policy: str | Path | None = None,
    data_names: Sequence[str] = (),
    progress: bool = True,
    echo: Callable[[str], Any] = print,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train `policy` (the SFT target; the pivot when there is no SFT stage) on `pairs` and publish it at `out`.

    Resumes from the newest complete checkpoint under `checkpoints`; skips when `out` is already this
    target. Works under `accelerate launch` as explicit fusion's training does (the main process writes).

    Args:
        recipe: the implicit recipe: pivot, sources, chat_template, training, implicit.preference.
        pairs: the preference pairs (`read_preference_data`).
        out: the target folder (written under a temporary name, renamed when complete).
        checkpoints: where the Trainer checkpoints go (resumed from when present).
        policy: the model to train, also the frozen reference; default: the pivot.
        data_names: the data files, named in the model card.
        progress: progress bars.
        echo: where one-line status messages go.
        callbacks: extra transformers TrainerCallbacks (loss curves for the demo, tests).
    """
    from accelerate import PartialState

    from fusemerge.fuse.train import _NOT_IDENTITY, _claim_checkpoints, _stamp_matches

    out, checkpoints = Path(out), Path(checkpoints)
    pref = recipe.implicit.preference
    policy = str(policy or recipe.pivot.model)
    student = preference_student(recipe=recipe, policy=policy)
    tokenizer = policy_tokenizer(recipe=recipe, policy=policy)
    template = tokenizer.chat_template
    dataset, left_out, fingerprint = preference_dataset(pairs=pairs, loss=pref.loss)
    identity = {
        "stage": "preference",
        "pivot": recipe.pivot.model,
        "sources": [s.model for s in recipe.sources],
        "policy": read_stamp(folder=Path(policy)) or policy,
        "chat_template": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "data": fingerprint,
        "preference": pref.model_dump(mode="json"),
        "training": student.training.model_dump(mode="json", exclude=_NOT_IDENTITY),
    }
    if _stamp_matches(out, identity):
        echo(f"preference {out.name}: target complete, skipped ({out})")
        return out
    if out.exists():
        raise FusemergeError(
            "folder exists and is not this preference target (fusemerge_target.json differs); delete it",
            file=out,
        )
    state = PartialState()
    if state.is_main_process:
        _claim_checkpoints(checkpoints, identity)
        last_complete_checkpoint(
            checkpoints=checkpoints
        )  # deletes half-written ones, once, before any process reads
    state.wait_for_everyone()

    trainer = build_preference_trainer(
        recipe=recipe,
        student=student,
        tokenizer=tokenizer,
        dataset=dataset,
        checkpoints=checkpoints,
        progress=progress,
        callbacks=callbacks,
    )
    last = last_complete_checkpoint(checkpoints=checkpoints)
    echo(
        f"preference {out.name}: {pref.loss} (beta {pref.beta}) on {trainer.args.device}, {len(trainer.train_dataset)} pairs"
        + (f" ({left_out} without chosen_target left out)" if left_out else "")
        + (f"; resuming from {Path(last).name}" if last else "")
    )
    trainer.train(resume_from_checkpoint=last)
    staging = checkpoints / "final"
    trainer.save_model(str(staging))  # gathers ZeRO-3 / FSDP shards; adapters only for lora / qlora
    if state.is_main_process:
        stages = (["SFT"] if policy != recipe.pivot.model else []) + [
            f"preference optimisation ({pref.loss})"
        ]
        card = implicit_card(
            pivot=recipe.pivot.model,
            sources=[s.model for s in recipe.sources],
            stages=stages,
            data=list(data_names),
            recipe_text=recipe.raw_yaml,
            tags=[pref.loss, f"{recipe.training.mode}-training"],
        )
        save_target(
            staging=staging,
            out=out,
            base=student.pivot,
            mode=recipe.training.mode,
            tokenizer=tokenizer,
            dtype=model_dtype(model=recipe.pivot.model, trust_remote_code=recipe.pivot.trust_remote_code),
            card=card,
            recipe_text=recipe.raw_yaml,
            identity=identity,
        )
        echo(f"preference {out.name}: saved {out}")
    state.wait_for_everyone()
    return out
