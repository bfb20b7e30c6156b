"""`-q` means no progress bars at all, the libraries' own included.

Our bars follow each command's `progress` flag, but transformers ("Loading weights", "Writing model
shards") and huggingface_hub draw their own; a quiet command turns those off once, for the process,
instead of every call site toggling them around its own loads.
"""

from __future__ import annotations


def silence_library_progress() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
