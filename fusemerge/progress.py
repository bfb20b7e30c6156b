"""Progress bars, one way for every long step (merge, teacher pass, align, eval); `-q` turns them all off.

Our bars follow each command's `progress` flag, but transformers ("Loading weights", "Writing model
shards") and huggingface_hub draw their own; a quiet command turns those off once, for the process,
instead of every call site toggling them around its own loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def progress_bar(
    total: int, desc: str, *, enabled: bool = True, unit: str = "seq", unit_scale: bool = False
) -> Any:
    """A tqdm bar (a context manager too); a disabled one when `enabled` is false, so callers never branch.

    Args:
        total: the number of units the step will process.
        desc: the bar's label: the step and the model or file it works on.
        enabled: false under `-q`, or on the non-main processes of a launcher.
        unit: what one step of `update` counts ("seq", "B").
        unit_scale: show 1.2M instead of 1200000 (for bytes).
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True, disable=not enabled
    )


class TokenRate:
    """A bar over sequences with a tokens/s postfix: tqdm's own rate and ETA count sequences, but a
    throughput worth comparing between models and machines is tokens per second."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True) -> None:
        self.bar = progress_bar(total, desc, enabled=enabled)
        self.tokens = 0
        self.start = time.perf_counter()

    def update(self, sequences: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(sequences)

    def close(self) -> None:
        self.bar.close()


def silence_library_progress() -> None:
    """Turn off, for the process, the bars that transformers, huggingface_hub and datasets draw themselves
    (datasets: the "Tokenizing train dataset" maps that TRL's trainers run while they are built)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        import datasets
    except ImportError:  # only the implicit stages (TRL) need it
        return
    datasets.disable_progress_bars()


@contextmanager
def library_progress(enabled: bool) -> Iterator[None]:
    """Within the block, the libraries' own bars follow `enabled` (a call site's `progress`), then they
    are as they were: a library call with `progress=False` is as quiet as the command under `-q`."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    restore: list[Callable[[], None]] = []
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore.append(hf_logging.enable_progress_bar)
    if not are_progress_bars_disabled():
        disable_progress_bars()
        restore.append(enable_progress_bars)
    try:
        import datasets
    except ImportError:
        datasets = None  # type: ignore[assignment]
    if datasets is not None and datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        restore.append(datasets.enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()
