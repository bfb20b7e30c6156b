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
own best answer) tokenized by TRL's own preparation and batched by TRL's own collator
(`fusemerge.fuse.implicit.loss_trainer`). Each completion ends on a stop token, appended when the chat
template writes none (`fusemerge.fuse.implicit.turns`). TRL is imported only when a trainer is built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fusemerge.card import implicit_card
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.datasets import PreferencePair
from fusemerge.fuse.implicit.losses import TARGET_LOSSES, TRL_LOSS_TYPES
from fusemerge.fuse.implicit.sft import logged
from fusemerge.fuse.implicit.target import (
    ImplicitRecipe,
    Student,
    model_dtype,
    read_stamp,
    save_target,
    train_stage,
    trl_config,
)
from fusemerge.fuse.implicit.turns import turn_end
from fusemerge.fuse.recipe import ModelSpec
from fusemerge.progress import library_progress


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
    from fusemerge.lm.loading import load_tokenizer
    from fusemerge.lm.templates import resolve_render_template

    tokenizer = load_tokenizer(policy, trust_remote_code=recipe.pivot.trust_remote_code)
    tokenizer.chat_template = resolve_render_template(recipe.chat_template, tokenizer)
    return tokenizer


def turn_eos_id(tokenizer: Any) -> int | None:
    """The stop token the pairs' completions get, when the tokenizer's chat template writes none."""
    end = turn_end(tokenizer, tokenizer.chat_template)
    return int(tokenizer.convert_tokens_to_ids(end.eos)) if end.needs_eos else None


def build_preference_trainer(
    *,
    recipe: ImplicitRecipe,
    student: Student,
    tokenizer: Any,
    dataset: Any,
    checkpoints: Path,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> Any:
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

    from fusemerge.fuse.implicit.loss_trainer import ClosedTurnsTrainer, RegisteredLossTrainer, TargetCollator
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
        "turn_eos_id": turn_eos_id(tokenizer),
    }
    if pref.loss in TRL_LOSS_TYPES:
        trainer = ClosedTurnsTrainer(**common)
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
    from fusemerge.fuse.train import NOT_IDENTITY

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
        "turn_eos": turn_eos_id(tokenizer),
        "data": fingerprint,
        "preference": pref.model_dump(mode="json"),
        "training": student.training.model_dump(mode="json", exclude=NOT_IDENTITY),
    }

    def publish(trainer: Any, staging: Path) -> None:
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

    with library_progress(progress):  # TRL's dataset maps, transformers' loading and saving bars
        return train_stage(
            stage="preference",
            out=out,
            checkpoints=checkpoints,
            identity=identity,
            build=lambda: logged(
                build_preference_trainer(
                    recipe=recipe,
                    student=student,
                    tokenizer=tokenizer,
                    dataset=dataset,
                    checkpoints=checkpoints,
                    progress=progress,
                    callbacks=callbacks,
                ),
                echo,
            ),
            started=lambda trainer: (
                f"preference {out.name}: {pref.loss} (beta {pref.beta}) on {trainer.args.device}, "
                f"{len(trainer.train_dataset)} pairs"
                + (f" ({left_out} without chosen_target left out)" if left_out else "")
            ),
            publish=publish,
            echo=echo,
        )
