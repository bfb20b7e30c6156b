"""Training one fused target: the pivot learns `lambda * CLM + (1 - lambda) * fusion` with transformers' Trainer.

    from fusemerge.fuse.train import train_target
    train_target(recipe, data, pivot_store=..., aligned={"solar": ...}, out="fused/openchat-solar",
                 checkpoints="fused/work/train/openchat-solar")

    accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml -m fusemerge.cli \\
        fuse recipes/fusechat-7b.yml --steps train        # the same code on many GPUs

This module is the target's lifecycle: stamp, claim the checkpoints, build the trainer (the student from
`load_student`, TrainingArguments from `fusemerge.fuse.hf_compat`, `FusionTrainer` from
`fusemerge.fuse.trainer`), train or resume, fold and save.

`training.mode`: `full` fine-tunes every weight; `lora` trains peft adapters; `qlora` trains adapters on a
4-bit base (CUDA + bitsandbytes only). Adapters are folded into full-precision pivot weights when the
target is saved (`merge_and_unload`), so the merge stage always sees plain full tensors.

A target folder appears under its final name only when complete, with `fusemerge_target.json` saying what
it was trained from; a rerun skips it, and retrains it when only a model's weights changed since (its
fingerprint). An interrupted training resumes from its last complete checkpoint under `checkpoints`
(every `training.save_steps` optimizer steps, and at the end; one that a kill left half-written is
removed, with a line). A NaN or Inf weight in the pivot is refused before training, and a NaN or Inf loss
or gradient norm stops it before that step is applied (`fusemerge.fuse.trainer.guard_divergence`):
exit 2, the checkpoints kept, no target. The weights are saved in the
dtype `training.save_dtype` picks (`fusemerge.fuse.save_dtype`: by default float32 unless rounding to the
pivot's dtype keeps the update within 1%), and the checkpoints are removed once the target is saved
unless `training.keep_checkpoints`. A fine-tune (`fusion.function: none`) reads no store at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusemerge.card import finetune_card, fused_card
from fusemerge.checkpoint.layout import (
    RECIPE_NAME,
    TARGET_STAMP,
    remove_path,
    staged_folder,
    usual_folder_modes,
)
from fusemerge.errors import FusemergeError
from fusemerge.fuse.hf_compat import precision, training_arguments
from fusemerge.fuse.recipe import FuseRecipe
from fusemerge.fuse.store import TopKStore
from fusemerge.fuse.trainer import FusionTrainer, last_complete_checkpoint
from fusemerge.fuse.workdir import FINAL_CHECKPOINT, OBSERVING, TRAIN_STAMP
from fusemerge.lm.chat_data import ChatData
from fusemerge.lm.loading import FourBit, four_bit_config, load_causal_lm, load_tokenizer
from fusemerge.lm.padding import pad_token_id

# settings that change how a run is observed or saved, not what it trains: free to change on a resume
NOT_IDENTITY = OBSERVING


# ---------------------------------------------------------------- devices and models


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_student(recipe: FuseRecipe, *, cuda: bool) -> Any:
    """The pivot as the model to train: float32 master weights, or a frozen base (bf16 or 4-bit) + adapters."""

    spec, training = recipe.pivot, recipe.training
    # LoRA under bf16 mixed precision: the frozen base in bf16 (half the memory; autocast runs its matmuls
    # in bf16 anyway) while peft keeps the adapters in float32. Full fine-tuning keeps float32 masters.
    frozen_bf16 = training.mode == "lora" and precision(training.dtype, cuda)["bf16"]
    quant = device_map = None
    if training.mode == "qlora":
        quant = four_bit_config(
            FourBit(compute_dtype="bfloat16"),
            cuda=cuda,
            option="qlora",
            no_gpu="qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora or full",
            key="training.mode",
        )
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    # the pivot's weights were checked (and its teacher pass run) under the recipe's pickle policy already
    model = load_causal_lm(
        spec.model,
        dtype="bfloat16" if frozen_bf16 else "float32",
        allow_pickle=True,
        trust_remote_code=spec.trust_remote_code,
        quantization_config=quant,
        device_map=device_map,
        what="the pivot",
    )
    model.config.use_cache = False
    from fusemerge.checkpoint.finite import check_finite_model

    check_finite_model(model, what="the pivot", file=spec.model)  # a NaN weight trains an all-NaN target
    if training.mode == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    # The adapters are drawn here, before the Trainer seeds anything: seed first, or two identical runs
    # (and a run killed before its first checkpoint, then rerun) start from different adapters.
    set_seed(training.seed)

    if training.mode == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training.gradient_checkpointing
        )
    config = LoraConfig(
        r=training.lora_r,
        lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout,
        target_modules=training.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if training.gradient_checkpointing:
        model.enable_input_require_grads()  # adapters after a frozen embedding still get gradients
    return model


# ---------------------------------------------------------------- one target


def target_identity(
    recipe: FuseRecipe, sources: list[str], stores: list[TopKStore], data: ChatData | None = None
) -> dict[str, Any]:
    """What a target's training depends on: checkpoints made for anything else are refused, never reused.

    A fused target is bound to its data by its stores; a fine-tune, which reads none, by the data's
    fingerprint. Both are bound to the pivot's weights by its content fingerprint. The target folder's
    stamp adds the save dtype (`saved_identity`).
    """
    from fusemerge.fuse.teacher import model_fingerprint

    identity: dict[str, Any] = {
        "pivot": recipe.pivot.model,
        "pivot_fingerprint": model_fingerprint(recipe.pivot.model),
    }
    if recipe.fine_tune:
        identity["fusion"] = {"function": "none"}
        identity["data"] = data.fingerprint() if data is not None else None
    else:
        identity["sources"] = sources
        identity["stores"] = [s.identity for s in stores]
        identity["fusion"] = recipe.fusion.model_dump(mode="json", by_alias=True)
    identity["training"] = recipe.training.model_dump(mode="json", exclude=OBSERVING)
    return identity


def saved_identity(recipe: FuseRecipe, identity: dict[str, Any]) -> dict[str, Any]:
    """The target folder's stamp: the training's identity and the save dtype setting."""
    return {**identity, "save_dtype": recipe.training.save_dtype}


def train_target(
    recipe: FuseRecipe,
    data: ChatData,
    *,
    pivot_store: str | Path | TopKStore | None,
    aligned: Mapping[str, str | Path | TopKStore],
    out: str | Path,
    checkpoints: str | Path,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> Path:
    """Train the pivot on the fused targets of `aligned` sources and save it as a model folder at `out`.

    Args:
        recipe: the fuse recipe (pivot, fusion, training sections; its YAML goes into the card).
        data: the rendered sequences, the same that made the stores.
        pivot_store: the pivot's own top-K store; None for a fine-tune.
        aligned: source model (as named in the recipe) -> its aligned store; one for pairwise fusion,
            none for a fine-tune.
        out: the target model folder (written under a temporary name, renamed when complete).
        checkpoints: where the Trainer checkpoints go (resumed from when present).
        progress: progress bars.
        echo: where one-line status messages go.
    """
    from accelerate import PartialState

    out, checkpoints = Path(out), Path(checkpoints)
    stores = {} if recipe.fine_tune or pivot_store is None else {"pivot": _open(pivot_store)}
    if stores:
        stores |= {k: _open(v) for k, v in aligned.items()}
    identity = target_identity(recipe, list(aligned), list(stores.values()), data)
    stamp = saved_identity(recipe, identity)
    if stamp_matches(out, stamp):
        echo(f"train {out.name}: target complete, skipped ({out})")
        return out
    replace = out.exists() and weights_changed(out / TARGET_STAMP, stamp)
    if replace:
        echo(
            f"train {out.name}: the target was trained from other weights of the same models (a model "
            "fingerprint differs): training it again; the old target is replaced once the new one is saved"
        )
    elif out.exists():
        raise FusemergeError(
            f"holds another run's target ({TARGET_STAMP} differs{_differences(out / TARGET_STAMP, stamp)});"
            " give this recipe another output",
            file=out,
        )
    state = PartialState()
    if state.is_main_process:
        claim_checkpoints(checkpoints, identity, echo=lambda line: echo(f"train {out.name}: {line}"))
        # half-written checkpoints (a kill while saving) are removed before any process looks for one
        last_complete_checkpoint(checkpoints=checkpoints, echo=lambda line: echo(f"train {out.name}: {line}"))
    state.wait_for_everyone()

    selection = teacher_selection(recipe, data, stores)
    trainer = build_trainer(recipe, data, stores, checkpoints=checkpoints, progress=progress, echo=echo)
    last = last_complete_checkpoint(checkpoints=checkpoints)
    what = (
        "fine-tune, CLM loss alone (no teachers)"
        if recipe.fine_tune
        else f"fusion {recipe.fusion.function} over {', '.join(aligned)}"
    )
    echo(
        f"train {out.name}: {recipe.training.mode} on {trainer.args.device}, {len(data.sequences)} "
        f"sequences, {what}; checkpoints in {checkpoints}"
        + (f"; resuming from {Path(last).name}" if last else "")
    )
    for line in selection:
        echo(
            f"train {out.name}: {'MinCE picks' if recipe.fusion.function == 'mince' else 'heaviest avgce teacher'} {line}"
        )
    trainer.train(resume_from_checkpoint=last)
    staging = checkpoints / FINAL_CHECKPOINT
    trainer.save_model(str(staging))  # gathers ZeRO-3 / FSDP shards; adapters only for lora / qlora
    if state.is_main_process:
        line = save_target(
            recipe,
            staging,
            out,
            sources=list(aligned),
            identity=stamp,
            tokenizer=trainer.processing_class,
            replace=replace,
            selection=selection,
        )
        echo(f"train {out.name}: {line}")
        if not recipe.training.keep_checkpoints:
            remove_path(checkpoints)
        echo(f"train {out.name}: saved {out}")
    state.wait_for_everyone()
    return out


def teacher_selection(recipe: FuseRecipe, data: ChatData, stores: Mapping[str, TopKStore]) -> list[str]:
    """Per domain, which candidate wins the sequence-level choice by `fusion.metric` (none: a fine-tune).

    Logged before training and written into the card: a teacher that wins a domain it models worse per
    byte than the pivot (per-token MinCE with a finer tokenizer) shows here first."""
    if recipe.fine_tune or len(stores) < 2 or recipe.fusion.function == "mince_token":
        return []  # mince_token chooses per token; the sequence-level choice is only its fallback
    from fusemerge.fuse.report import selection_counts, selection_lines, sequence_domains

    names = {"pivot": "pivot", **{k: Path(k.rstrip("/")).name or k for k in stores if k != "pivot"}}
    counts = selection_counts(
        {names[k]: v for k, v in stores.items()}, recipe.fusion.metric, sequence_domains(recipe, data)
    )
    return selection_lines(counts, recipe.fusion.metric)


def build_trainer(
    recipe: FuseRecipe,
    data: ChatData,
    stores: Mapping[str, TopKStore],
    *,
    checkpoints: Path,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> FusionTrainer:
    """The Trainer for one target: the student, the dataset, the collator over `stores` ("pivot" + sources;
    none for a fine-tune). Without progress bars the training log goes to `echo`, one line per log."""
    from fusemerge.fuse.collate import FusionCollator, FusionDataset

    cuda = has_cuda()
    spec = recipe.pivot
    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    pad = pad_token_id(tokenizer, fallback=tokenizer.eos_token_id or 0)
    lambda_ = recipe.fusion.clm_weight
    collator = FusionCollator(
        stores.get("pivot"),
        {k: v for k, v in stores.items() if k != "pivot"},
        function=recipe.fusion.function,
        metric=recipe.fusion.metric,
        temperature=recipe.fusion.temperature,
        pad_id=pad,
        with_targets=lambda_ < 1.0,
    )
    return FusionTrainer(
        model=load_student(recipe, cuda=cuda),
        args=training_arguments(recipe, checkpoints, cuda=cuda, progress=progress),
        data_collator=collator,
        train_dataset=FusionDataset(data, tokenizer),
        processing_class=tokenizer,
        lambda_=lambda_,
        loss_kind=recipe.fusion.loss,
        echo=echo,
    )


def save_target(
    recipe: FuseRecipe,
    staging: Path,
    out: Path,
    *,
    sources: list[str],
    identity: dict,
    tokenizer: Any = None,
    replace: bool = False,
    selection: list[str] | None = None,
) -> str:
    """The trained weights (adapters folded into float32 pivot weights) as a model folder in the dtype
    `training.save_dtype` picks, with tokenizer, config, card and stamp; it appears under `out` only when
    complete. Returns the line that says which dtype and why (`fusemerge.fuse.save_dtype`).

    `tokenizer` is the pivot's, already loaded by the trainer (loaded here when not given); `replace`: a
    stale target at `out` (trained from older weights) gives way once the new one is complete;
    `selection`: the lines of `teacher_selection` for the card."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fusemerge.fuse.save_dtype import choose_save_dtype

    pivot = recipe.pivot
    dtype = getattr(
        AutoConfig.from_pretrained(pivot.model, trust_remote_code=pivot.trust_remote_code), "dtype", None
    )
    dtype = (
        dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float32"), torch.float32)
    )
    remote = {"trust_remote_code": pivot.trust_remote_code}
    if recipe.training.mode == "full":
        model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32, **remote)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(pivot.model, dtype=torch.float32, **remote)
        model = PeftModel.from_pretrained(base, staging).merge_and_unload()
    choice = choose_save_dtype(
        recipe.training.save_dtype, pivot=pivot.model, pivot_dtype=dtype, trained=model.state_dict()
    )
    model = model.to(choice.dtype)
    model.config.use_cache = True
    out.parent.mkdir(parents=True, exist_ok=True)
    if recipe.fine_tune:
        card = finetune_card(
            pivot=pivot.model, recipe_text=recipe.raw_yaml, extra_tags=[f"{recipe.training.mode}-training"]
        )
    else:
        card = fused_card(
            pivot=pivot.model,
            sources=sources,
            recipe_text=recipe.raw_yaml,
            extra_tags=[recipe.fusion.function, f"{recipe.training.mode}-training"],
            selection=selection,
        )
    with staged_folder(out, replace=replace) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        usual_folder_modes(tmp)  # safetensors writes 0600
        (tokenizer or load_tokenizer(pivot.model, trust_remote_code=pivot.trust_remote_code)).save_pretrained(
            tmp
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if recipe.raw_yaml:
            (tmp / RECIPE_NAME).write_text(recipe.raw_yaml, encoding="utf-8")
        (tmp / TARGET_STAMP).write_text(
            json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    return choice.line


def _open(store: str | Path | TopKStore) -> TopKStore:
    return store if isinstance(store, TopKStore) else TopKStore.open(store)


def stamp_matches(folder: Path, identity: dict[str, Any], name: str = TARGET_STAMP) -> bool:
    stamp = folder / name
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == json.loads(json.dumps(identity))
    except json.JSONDecodeError:
        return False


def claim_checkpoints(
    checkpoints: Path, identity: dict[str, Any], *, echo: Callable[[str], Any] = print
) -> None:
    """Checkpoints resume only the run they were made for; others are an error, not a silent restart.

    Checkpoints of this very run made from older weights of its models (only a model fingerprint
    differs: the weights were overwritten in place) are stale: removed, and training starts over.
    """
    stale = (
        checkpoints.is_dir()
        and any(checkpoints.iterdir())
        and not stamp_matches(checkpoints, identity, TRAIN_STAMP)
    )
    if stale and weights_changed(checkpoints / TRAIN_STAMP, identity):
        echo(
            "checkpoints were made from other weights of the same models (a model fingerprint differs): "
            "removed, training starts over"
        )
        remove_path(checkpoints)
    elif stale:
        raise FusemergeError(
            f"training checkpoints here were made for other settings, stores or data ({TRAIN_STAMP} differs"
            f"{_differences(checkpoints / TRAIN_STAMP, identity)}); fusemerge leaves them as they are: give "
            "this recipe its own work_dir (or rerun teach and align if the data changed)",
            file=checkpoints,
        )
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / TRAIN_STAMP).write_text(
        json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def weights_changed(stamp: Path, identity: dict[str, Any]) -> bool:
    """The stamp differs from `identity` only in model fingerprints: same recipe, same data, same stores'
    settings, but a model's weights changed in place since; what was made from them is stale."""
    try:
        there = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    here = json.loads(json.dumps(identity))
    return there != here and _without_fingerprints(there) == _without_fingerprints(here)


def _without_fingerprints(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_fingerprints(v) for k, v in value.items() if not k.endswith("fingerprint")}
    if isinstance(value, list):
        return [_without_fingerprints(v) for v in value]
    return value


def _differences(stamp: Path, identity: dict[str, Any]) -> str:
    """`: in fusion.lambda (0.9 there, 0.7 here), ...`: the keys where a stamp and `identity` differ."""
    try:
        there = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ""
    here = json.loads(json.dumps(identity))
    keys = [
        k for k in sorted(set(_flat(there)) | set(_flat(here))) if _flat(there).get(k) != _flat(here).get(k)
    ]
    if not keys:
        return ""
    shown = [f"{k} ({_flat(there).get(k)!r} there, {_flat(here).get(k)!r} here)" for k in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ": in " + ", ".join(shown) + more


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}
