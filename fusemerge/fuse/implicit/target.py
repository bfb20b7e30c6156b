"""What `sft` and `preference` share: the student they train, TRL's config from the recipe, checkpoints
that resume only when complete and a guard against divergence (both `fusemerge.fuse.trainer`, shared
with explicit fusion), and the target folder they publish.

The student and its TrainingArguments come from explicit fusion (`fusemerge.fuse.train.load_student`,
`training_arguments`), so LoRA/QLoRA/full, precision, seeds, activation checkpointing and `accelerate
launch` behave exactly as they do there; TRL's SFTConfig and DPOConfig are TrainingArguments plus their
own fields, so the same arguments are carried over field by field and only the TRL fields are added.

A target folder appears under its final name only when complete (`staged_folder`), with the tokenizer
(carrying the chat template the model was trained with), a model card, the recipe and the
`fusemerge_target.json` stamp that says what it was trained from; a rerun with the same inputs skips it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fusemerge.checkpoint.layout import RECIPE_NAME, TARGET_STAMP, staged_folder
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.spec import ImplicitSpec
from fusemerge.fuse.recipe import ModelSpec, TrainingSpec


class ImplicitRecipe(Protocol):
    """The parts of a fuse recipe with `fusion: {kind: implicit}` that the training half reads."""

    @property
    def pivot(self) -> ModelSpec: ...
    @property
    def sources(self) -> list[ModelSpec]: ...
    @property
    def training(self) -> TrainingSpec: ...
    @property
    def implicit(self) -> ImplicitSpec: ...
    @property
    def chat_template(self) -> str: ...
    @property
    def raw_yaml(self) -> str: ...


@dataclass(frozen=True)
class Student:
    """What `load_student` and `training_arguments` read of a recipe: the model to train and how.

    For `sft` it is the recipe's pivot and `training`; for `preference` the SFT target and the
    `implicit.preference` settings over `training`.
    """

    pivot: ModelSpec
    training: TrainingSpec


def trl_config(
    *, config_cls: type, student: Student, checkpoints: Path, cuda: bool, progress: bool, **extra: Any
) -> Any:
    """TRL's config (SFTConfig, DPOConfig) with every TrainingArguments field as explicit fusion sets it.

    Args:
        config_cls: `trl.SFTConfig` or `trl.DPOConfig`.
        student: the model to train and its training settings.
        checkpoints: the Trainer's output folder (checkpoints, resumed from).
        cuda: whether training runs on a GPU (precision flags, `use_cpu`).
        progress: the Trainer's progress bar.
        extra: the TRL-specific fields (max_length, beta, loss_type, ...).
    """
    from fusemerge.fuse.hf_compat import training_arguments

    args = training_arguments(student, checkpoints, cuda=cuda, progress=progress)  # type: ignore[arg-type]
    fields = {k: v for k, v in args.to_dict().items() if k not in ("hub_token", "push_to_hub_token")}
    return config_cls(**(fields | extra))


def read_stamp(*, folder: Path) -> dict[str, Any] | None:
    """The `fusemerge_target.json` of a target folder, or None when it has none (or it is unreadable).

    Args:
        folder: the target folder.
    """
    try:
        return json.loads((folder / TARGET_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_target(
    *,
    staging: Path,
    out: Path,
    base: ModelSpec,
    mode: str,
    tokenizer: Any,
    dtype: Any,
    card: str,
    recipe_text: str,
    identity: dict[str, Any],
) -> Path:
    """Publish the trained weights at `out` as a plain model folder; it appears only when complete.

    Args:
        staging: what `trainer.save_model` wrote: full weights, or adapters for lora/qlora.
        out: the target folder.
        base: the model the adapters extend (the pivot for `sft`, the SFT target for `preference`).
        mode: `training.mode`; adapters are folded into float32 base weights (`merge_and_unload`).
        tokenizer: saved beside the weights, with the chat template the model was trained with.
        dtype: the dtype the weights are saved in (the pivot's own).
        card: README.md.
        recipe_text: the recipe, saved as fusemerge_recipe.yml.
        identity: what the target was trained from, saved as its stamp.
    """
    import torch
    from transformers import AutoModelForCausalLM

    remote = {"trust_remote_code": base.trust_remote_code}
    if mode == "full":
        model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32, **remote)
    else:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base.model, dtype=torch.float32, **remote)
        model = PeftModel.from_pretrained(model, staging).merge_and_unload()
    model = model.to(dtype)
    model.config.use_cache = True
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if recipe_text:
            (tmp / RECIPE_NAME).write_text(recipe_text, encoding="utf-8")
        (tmp / TARGET_STAMP).write_text(
            json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    return out


def model_dtype(*, model: str, trust_remote_code: bool = False) -> Any:
    """The dtype a model's config declares (float32 when it declares none): targets keep the pivot's.

    Args:
        model: a model folder or Hub id (only its config is read).
        trust_remote_code: for configs that ship code.
    """
    import torch
    from transformers import AutoConfig

    declared = getattr(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), "dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return getattr(torch, str(declared or "float32"), torch.float32)


def train_stage(
    *,
    stage: str,
    out: Path,
    checkpoints: Path,
    identity: dict[str, Any],
    build: Callable[[], Any],
    started: Callable[[Any], str],
    publish: Callable[[Any, Path], None],
    echo: Callable[[str], Any] = print,
) -> Path:
    """One training stage from claim to published target, the part `sft` and `preference` share.

        A finished target with this `identity` is skipped; a folder made for anything else is refused;
        checkpoints are claimed for `identity` and resumed only when complete (a half-written one is deleted
        first, once, by the main process, with a line); a NaN or Inf loss or gradient norm stops the stage
    (`fusemerge.fuse.trainer.guard_divergence`); only the main process publishes.

        Args:
            stage: the stage's name in messages ("sft", "preference").
            out: the target folder.
            checkpoints: the Trainer's output folder.
            identity: what the target depends on (its stamp).
            build: makes the trainer (called after the checkpoints are claimed).
            started: the status line for the trainer, before training starts.
            publish: `(trainer, staging)` -> writes the target from the final weights in `staging`.
            echo: where one-line status messages go.
    """
    from accelerate import PartialState

    from fusemerge.fuse.train import claim_checkpoints, stamp_matches
    from fusemerge.fuse.trainer import guard_divergence, last_complete_checkpoint
    from fusemerge.fuse.workdir import FINAL_CHECKPOINT

    if stamp_matches(out, identity):
        echo(f"{stage} {out.name}: target complete, skipped ({out})")
        return out
    if out.exists():
        raise FusemergeError(
            f"folder exists and is not this {stage} target ({TARGET_STAMP} differs); delete it", file=out
        )
    state = PartialState()
    if state.is_main_process:
        claim_checkpoints(checkpoints, identity, echo=lambda line: echo(f"{stage} {out.name}: {line}"))
        # half-written checkpoints (a kill while saving) are removed before any process looks for one
        last_complete_checkpoint(
            checkpoints=checkpoints, echo=lambda line: echo(f"{stage} {out.name}: {line}")
        )
    state.wait_for_everyone()

    trainer = build()
    guard_divergence(trainer)  # a NaN/Inf loss or gradient norm stops the stage before that update
    last = last_complete_checkpoint(checkpoints=checkpoints)
    echo(started(trainer) + (f"; resuming from {Path(last).name}" if last else ""))
    trainer.train(resume_from_checkpoint=last)
    staging = checkpoints / FINAL_CHECKPOINT
    trainer.save_model(str(staging))  # gathers ZeRO-3 / FSDP shards; adapters only for lora / qlora
    if state.is_main_process:
        publish(trainer, staging)
        echo(f"{stage} {out.name}: saved {out}")
    state.wait_for_everyone()
    return out
