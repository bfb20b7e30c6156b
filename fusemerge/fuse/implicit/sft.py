"""The `sft` step of implicit fusion: the pivot fine-tuned on the best response per prompt, with TRL.

    from fusemerge.fuse.implicit.datasets import read_sft_data
    from fusemerge.fuse.implicit.sft import run_sft
    records = read_sft_data(spec=DataFileSpec(path="fused/work/implicit/sft.jsonl"))
    run_sft(recipe=recipe, records=records, out=Path("fused/llama-sft"),
            checkpoints=Path("fused/work/implicit/train/sft"))

FuseChat-3.0's first stage (3 epochs, lr 5e-6 for Llama, 2e-6 for Qwen/Gemma, 2,048 tokens): it moves the
pivot towards the sources' distribution so that the preference stage compares responses the pivot could
plausibly have written.

Loss on the assistant turns only, in the pivot's own chat template (or the recipe's `chat_template`). The
conversations are tokenized here, with fusemerge's span renderer (`fusemerge.fuse.data`), and handed to
TRL's SFTTrainer already tokenized with an `assistant_masks` column, from which TRL builds the labels. Why
not TRL's own `assistant_only_loss`: it needs `{% generation %}` markers in the template and patches in
only the templates it knows, while the span renderer finds the assistant turns in any template, the same
way explicit fusion does. Each assistant turn ends with a stop token, appended when the template writes
none (`fusemerge.fuse.implicit.turns`), or the target would never learn to stop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fusemerge.card import implicit_card
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.datasets import SftRecord
from fusemerge.fuse.implicit.target import (
    ImplicitRecipe,
    Student,
    model_dtype,
    save_target,
    train_stage,
    trl_config,
)
from fusemerge.fuse.implicit.turns import close_spans, turn_end
from fusemerge.progress import library_progress, progress_bar


def logged(trainer: Any, echo: Callable[[str], Any]) -> Any:
    """`trainer` printing each log as one line through `echo` (`fusemerge.fuse.trainer.one_line_logs`),
    not transformers' dict of strings, which it prints even when the progress bars are off (`-q`)."""
    from fusemerge.fuse.trainer import one_line_logs

    one_line_logs(trainer, echo)
    return trainer


def sft_identity(*, recipe: ImplicitRecipe, template: str, max_length: int, data: str) -> dict[str, Any]:
    """What an SFT target depends on: a folder or checkpoint made for anything else is refused, never reused.

    Args:
        recipe: the implicit recipe (pivot, sources, training).
        template: the chat template the conversations were rendered with.
        max_length: the token limit of a training sequence.
        data: the fingerprint of the tokenized dataset (`sft_dataset`).
    """
    from fusemerge.fuse.train import NOT_IDENTITY

    return {
        "stage": "sft",
        "pivot": recipe.pivot.model,
        "sources": [s.model for s in recipe.sources],
        "chat_template": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "max_length": max_length,
        "data": data,
        "training": recipe.training.model_dump(mode="json", exclude=NOT_IDENTITY),
    }


def sft_dataset(
    *, records: Sequence[SftRecord], tokenizer: Any, template: str, max_length: int, progress: bool = True
) -> tuple[Any, int, str]:
    """The conversations as a tokenized `datasets.Dataset` (`input_ids`, `assistant_masks`).

    A conversation longer than `max_length` tokens is cut there (as TRL would); one with no assistant token
    left is dropped, since it would teach nothing and an all-masked sequence makes a NaN loss.

    Args:
        records: the SFT conversations.
        tokenizer: the pivot's tokenizer.
        template: the chat template to render with (`resolve_render_template`).
        max_length: the token limit of a training sequence.
        progress: a progress bar over the records.

    Returns:
        (dataset, how many were dropped, sha256 fingerprint of the token ids and masks).
    """
    from datasets import Dataset

    from fusemerge.lm.chat import BadRecord, ChatSequence, render_conversation
    from fusemerge.lm.tokens import ChatTokenizer

    tok = ChatTokenizer(tokenizer)
    end = turn_end(tokenizer, template)
    ids_col: list[list[int]] = []
    mask_col: list[list[int]] = []
    dropped = 0
    digest = hashlib.sha256()
    with progress_bar(len(records), "sft: tokenizing", enabled=progress) as pbar:
        for rec in records:
            try:
                text, spans = render_conversation(rec.messages, tokenizer, template)
            except BadRecord as exc:
                raise FusemergeError(f"SFT record {rec.line}: {exc}", key="chat_template") from None
            text, spans = close_spans(text, spans, end)
            ids, mask = tok(ChatSequence(rec.line, text, spans))
            ids, mask = ids[:max_length].tolist(), mask[:max_length].astype(int).tolist()
            pbar.update(1)
            if not any(mask):
                dropped += 1
                continue
            ids_col.append(ids)
            mask_col.append(mask)
            digest.update(json.dumps([ids, mask]).encode("ascii"))
    if not ids_col:
        raise FusemergeError(
            f"no SFT record has an assistant turn within {max_length} tokens", key="implicit.sft_data"
        )
    return Dataset.from_dict({"input_ids": ids_col, "assistant_masks": mask_col}), dropped, digest.hexdigest()


def build_sft_trainer(
    *,
    recipe: ImplicitRecipe,
    tokenizer: Any,
    dataset: Any,
    checkpoints: Path,
    max_length: int,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> Any:
    """TRL's SFTTrainer over the tokenized conversations (`sft_dataset`); nothing trained yet.

    Args:
        recipe: the implicit recipe (pivot, training).
        tokenizer: the pivot's tokenizer (TRL pads with it; it is saved with the target).
        dataset: `input_ids` + `assistant_masks` rows; TRL turns the masks into labels.
        checkpoints: the Trainer's output folder.
        max_length: the token limit of a training sequence.
        progress: the Trainer's progress bar.
        callbacks: extra transformers TrainerCallbacks.
    """
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from fusemerge.fuse.train import has_cuda, load_student

    cuda = has_cuda()
    student = Student(recipe.pivot, recipe.training)
    set_seed(recipe.training.seed)  # LoRA adapters are drawn now: a rerun must draw the same ones
    model = load_student(student, cuda=cuda)  # type: ignore[arg-type]
    config = trl_config(
        config_cls=SFTConfig,
        student=student,
        checkpoints=checkpoints,
        cuda=cuda,
        progress=progress,
        max_length=max_length,
        packing=False,
        assistant_only_loss=False,  # the labels come from our assistant_masks column
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks)
    )
    return trainer


def run_sft(
    *,
    recipe: ImplicitRecipe,
    records: Sequence[SftRecord],
    out: Path,
    checkpoints: Path,
    max_length: int = 2048,
    data_names: Sequence[str] = (),
    progress: bool = True,
    echo: Callable[[str], Any] = print,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Fine-tune the pivot on `records` (assistant turns only) and publish it as a model folder at `out`.

    Resumes from the newest complete checkpoint under `checkpoints`; skips when `out` is already this
    target. Works under `accelerate launch` as explicit fusion's training does (the main process writes).

    Args:
        recipe: the implicit recipe: pivot, sources (named in the card), chat_template, training.
        records: the SFT conversations (`read_sft_data`).
        out: the target folder (written under a temporary name, renamed when complete).
        checkpoints: where the Trainer checkpoints go (resumed from when present).
        max_length: the token limit of a training sequence (FuseChat-3.0: 2,048).
        data_names: the data files, named in the model card.
        progress: progress bars.
        echo: where one-line status messages go.
        callbacks: extra transformers TrainerCallbacks (loss curves for the demo, tests).
    """
    from fusemerge.lm.loading import load_tokenizer
    from fusemerge.lm.templates import resolve_render_template

    out, checkpoints = Path(out), Path(checkpoints)
    pivot = recipe.pivot
    tokenizer = load_tokenizer(pivot.model, trust_remote_code=pivot.trust_remote_code)
    template = resolve_render_template(recipe.chat_template, tokenizer)
    dataset, dropped, fingerprint = sft_dataset(
        records=records, tokenizer=tokenizer, template=template, max_length=max_length, progress=progress
    )
    identity = sft_identity(recipe=recipe, template=template, max_length=max_length, data=fingerprint)
    tokenizer.chat_template = template  # the target chats in the template it was trained with

    def publish(trainer: Any, staging: Path) -> None:
        card = implicit_card(
            pivot=pivot.model,
            sources=[s.model for s in recipe.sources],
            stages=["SFT"],
            data=list(data_names),
            recipe_text=recipe.raw_yaml,
            tags=["sft", f"{recipe.training.mode}-training"],
        )
        save_target(
            staging=staging,
            out=out,
            base=pivot,
            mode=recipe.training.mode,
            tokenizer=tokenizer,
            dtype=model_dtype(model=pivot.model, trust_remote_code=pivot.trust_remote_code),
            card=card,
            recipe_text=recipe.raw_yaml,
            identity=identity,
        )

    with library_progress(progress):  # TRL's dataset maps, transformers' loading and saving bars
        return train_stage(
            stage="sft",
            out=out,
            checkpoints=checkpoints,
            identity=identity,
            build=lambda: logged(
                build_sft_trainer(
                    recipe=recipe,
                    tokenizer=tokenizer,
                    dataset=dataset,
                    checkpoints=checkpoints,
                    max_length=max_length,
                    progress=progress,
                    callbacks=callbacks,
                ),
                echo,
            ),
            started=lambda trainer: (
                f"sft {out.name}: {recipe.training.mode} on {trainer.args.device}, {len(dataset)} conversations"
                + (
                    f" ({dropped} without an assistant turn within {max_length} tokens left out)"
                    if dropped
                    else ""
                )
            ),
            publish=publish,
            echo=echo,
        )
