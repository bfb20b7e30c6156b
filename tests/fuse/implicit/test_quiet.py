"""`-q` and `progress=False` for the implicit stages: the bars TRL's trainers make `datasets` draw are off too."""

from __future__ import annotations

import datasets
from transformers.utils import logging as hf_logging

from fusemerge.progress import library_progress, silence_library_progress


def test_library_progress_turns_the_libraries_bars_off_within_and_back_on_after():
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()
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
