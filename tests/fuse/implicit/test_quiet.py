"""`-q` and `progress=False` for the implicit stages: the bars TRL's trainers make `datasets` draw are off too."""

from __future__ import annotations

import datasets
from transformers.utils import logging as hf_logging

from fusemerge.progress import library_progress, silence_library_progress


def test_library_progress_turns_the_libraries_bars_off_within_and_back_on_after():
    # the bars are process-wide switches: an earlier in-process `-q` run may have left them off
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()
    with library_progress(False):
        assert not datasets.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()
    with library_progress(True):
        assert datasets.is_progress_bar_enabled()


def test_quiet_silences_the_datasets_bars():
    """Before: `-q` left TRL's 'Tokenizing train dataset' bars on (datasets draws them, not transformers)."""
    try:
        silence_library_progress()
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


def test_quiet_trainers_log_one_line_through_echo_not_dicts_on_stdout(tiny_models, gpt2_tokenizer, tmp_path):
    """Before: with the bars off, transformers' PrinterCallback printed each log as a dict on stdout."""
    from train_helpers import make_recipe, sft_rows
    from transformers import PrinterCallback

    from fusemerge.fuse.implicit.datasets import SftRecord
    from fusemerge.fuse.implicit.sft import build_sft_trainer, logged, sft_dataset
    from fusemerge.fuse.trainer import LogLines
    from fusemerge.lm.templates import BUILTIN_TEMPLATES

    records = [SftRecord(i + 1, r["messages"]) for i, r in enumerate(sft_rows(2))]
    template = BUILTIN_TEMPLATES["chatml"]
    dataset, _, _ = sft_dataset(records=records, tokenizer=gpt2_tokenizer, template=template, max_length=36)
    trainer = build_sft_trainer(
        recipe=make_recipe(str(tiny_models["gpt2"])),
        tokenizer=gpt2_tokenizer,
        dataset=dataset,
        checkpoints=tmp_path,
        max_length=36,
        progress=False,
    )
    lines: list[str] = []
    logged(trainer, lines.append)
    kinds = {type(c) for c in trainer.callback_handler.callbacks}
    assert PrinterCallback not in kinds and LogLines in kinds
    trainer.train()
    assert lines and all(line.startswith("step ") for line in lines)
