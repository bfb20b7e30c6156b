"""The recipe's `training` section as TrainingArguments of the installed transformers.

    from fusemerge.fuse.hf_compat import training_arguments
    args = training_arguments(recipe, Path("work/train/openchat-solar"), cuda=True, progress=True)

Why a module of its own: transformers 5.x renames TrainingArguments fields between releases
(`gradient_checkpointing` -> `activation_checkpointing`, `group_by_length` -> `train_sampling_strategy`),
so the spelling is chosen here, from the fields the installed release has, and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fusemerge.fuse.recipe import FuseRecipe


def precision(dtype: str, cuda: bool) -> dict[str, bool]:
    """TrainingArguments' mixed-precision flags: bf16 where the device has it unless the recipe says."""
    import torch

    if dtype == "auto":
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16"}


def training_arguments(recipe: FuseRecipe, checkpoints: Path, *, cuda: bool, progress: bool) -> Any:
    """The recipe's `training` section as transformers 5.x TrainingArguments."""
    from transformers import TrainingArguments

    t = recipe.training
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # 5.x: a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        **checkpointing_arguments(t.gradient_checkpointing),
        **sampling_arguments(t.group_by_length),
        seed=t.seed,
        report_to="none",
        remove_unused_columns=False,  # the collator's features are not the model's arguments
        ddp_find_unused_parameters=False,  # every trained weight is used each step (adapters or all)
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=not progress,
        use_cpu=not cuda,
        **precision(t.dtype, cuda),
    )


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation (gradient) checkpointing as TrainingArguments spell it in the installed transformers.

    Recent 5.x releases call it `activation_checkpointing` (`gradient_checkpointing` is kept, deprecated);
    earlier 5.x releases (5.17, for one) know only `gradient_checkpointing` and reject the new name.
    """
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in _argument_names()
        else "gradient_checkpointing"
    )
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def sampling_arguments(group_by_length: bool) -> dict[str, Any]:
    """Length-grouped batches as TrainingArguments spell it in the installed transformers.

    Chat data mixes two-line exchanges with long code answers; random batches pad each short one to
    the longest in its batch, which can be most of the compute. transformers' LengthGroupedSampler
    keeps batches random but of similar lengths. Recent 5.x releases select it with
    `train_sampling_strategy`, earlier ones with `group_by_length`.
    """
    if "train_sampling_strategy" in _argument_names():
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def _argument_names() -> set[str]:
    """The TrainingArguments fields of the installed transformers (5.x renames some between releases)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    return {f.name for f in fields(TrainingArguments)}


def launched_rank_zero() -> bool:
    """True in the one process of a plain run, and in rank 0 of a launched one (torchrun and
    `accelerate launch` set RANK).

    Read from the environment, not from accelerate's `PartialState`: on the CPU, under
    `torch.distributed.run`, a PartialState made before the Trainer's says "not distributed" in every
    process (measured: both ranks report main), so each would take the run's lock for itself.
    """
    return int(os.environ.get("RANK", "0")) == 0


def launched_state() -> Any:
    """accelerate's PartialState of this process, with the launcher's process group on the CPU too.

    On the CPU under torchrun, a `PartialState()` made before the Trainer's says "not distributed" in
    every process (`launched_rank_zero`): each would sample every shard and its
    barriers would wait for nobody. When the launcher's WORLD_SIZE names more processes than the state
    knows, the state is made again with `cpu=True` (gloo), as the Trainer makes its own for a CPU run.
    """
    from accelerate import PartialState

    state = PartialState()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes != world:
        PartialState._reset_state()
        state = PartialState(cpu=True)
    return state


_PATIENT_GROUP: list[Any] = []  # the gloo group of `wait_for_everyone`, made once per process


def wait_for_everyone(state: Any) -> None:
    """Wait until every process of a launched run gets here (nothing to wait for in a single process).

    Through a gloo group with a timeout of a week, not `state.wait_for_everyone()`: under NCCL its
    barrier gives up after 10 minutes by default and kills the run, while one process finishes a long
    shard of a 70B source, or the main process scores every response with a reward model. Every process
    must call this at the same points (the group is made collectively, at the first call).
    """
    if state.num_processes <= 1:
        return
    from datetime import timedelta

    import torch.distributed as dist

    if not _PATIENT_GROUP:
        _PATIENT_GROUP.append(dist.new_group(backend="gloo", timeout=timedelta(days=7)))
    dist.barrier(group=_PATIENT_GROUP[0])
