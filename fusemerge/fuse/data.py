"""The fuse dataset: the recipe's `dataset` section rendered with the recipe's `chat_template`.

Everything generic (records, templates, rendering, splitting long conversations, per-model tokens) lives in
`fusemerge.lm`, shared with `fusemerge eval`; this module only maps the recipe onto it. The pivot's
tokenizer renders the text and measures `dataset.max_length`, so every model reads the same text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fusemerge.fuse.recipe import DatasetSpec
from fusemerge.lm.chat import read_records
from fusemerge.lm.chat_data import ChatData, render_records
from fusemerge.lm.templates import resolve_render_template


def build_chat_data(
    spec: DatasetSpec,
    pivot_tokenizer: Any,
    chat_template: str = "pivot",
    *,
    warn: Callable[[str], None] | None = None,
) -> ChatData:
    """Read, validate, render and length-limit every conversation of the dataset, in file order.

    Args:
        spec: the recipe's `dataset` section.
        pivot_tokenizer: renders the text (its template, its special tokens) and measures `max_length`.
        chat_template: "pivot", a built-in template name, or a .jinja file.
        warn: called with one line per skipped record (default: logged).
    """
    template = resolve_render_template(chat_template, pivot_tokenizer)
    return render_records(
        read_records(spec.path, spec.split),
        pivot_tokenizer,
        template,
        file=spec.path,
        fmt=spec.format,
        max_length=spec.max_length,
        split_long=spec.split_long,
        on_bad_record=spec.on_bad_record,
        limit=spec.limit,
        warn=warn,
    )
