"""A chat dataset as the texts every model reads: records -> rendered, length-limited `ChatSequence`s.

Length: `max_length` counts tokens of the rendering tokenizer (the pivot's, or eval's first model's) and is
applied once, here, so all models see identical texts. With `split_long` (FuseChat's choice) a long
conversation is cut between rounds (a user turn and the replies after it) into several sequences, each
repeating the system message; a single round that is still too long, or any long conversation without
`split_long`, is truncated at a token boundary.

A malformed record is reported with its line (or row) and skipped or fatal by `on_bad_record`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusemerge.errors import FusemergeError
from fusemerge.lm.chat import (
    BadRecord,
    ChatSequence,
    Message,
    Span,
    conversation_messages,
    render_conversation,
)
from fusemerge.lm.tokens import ChatTokenizer

LOG = logging.getLogger(__name__)


@dataclass
class ChatData:
    """The sequences of a dataset in order, plus what was skipped and why."""

    sequences: list[ChatSequence]
    skipped: list[FusemergeError] = field(default_factory=list)
    records: int = 0

    def fingerprint(self) -> str:
        """sha256 of the texts and spans: it binds a top-K store to exactly this data and template."""
        h = hashlib.sha256()
        for seq in self.sequences:
            h.update(json.dumps([seq.text, seq.spans], ensure_ascii=False).encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()


def render_records(
    records: Iterable[tuple[int, Any]],
    tokenizer: Any,
    template: str,
    *,
    file: str | Path,
    fmt: str,
    max_length: int,
    split_long: bool,
    on_bad_record: str,
    limit: int | None,
    warn: Callable[[str], None] | None = None,
) -> ChatData:
    """Validate, render and length-limit every record, in order (`read_records` gives the pairs).

    Args:
        records: (line or row number, record) pairs.
        tokenizer: renders the text (its special tokens) and measures `max_length`.
        template: the Jinja template (`fusemerge.lm.templates.resolve_render_template`).
        file: where the records came from, for messages.
        fmt: "auto", "openai" or "sharegpt".
        max_length, split_long: the length limit in `tokenizer` tokens and how it is met.
        on_bad_record: "skip" (warn and go on) or "error".
        limit: use only the first N records.
        warn: called with one line per skipped record (default: logged).
    """
    measure = ChatTokenizer(tokenizer)
    data = ChatData(sequences=[])
    for number, record in records:
        if limit is not None and data.records >= limit:
            break
        data.records += 1
        try:
            messages = conversation_messages(record, fmt)
            pieces = _fit(messages, tokenizer, template, measure, max_length, split_long)
        except BadRecord as exc:
            err = FusemergeError(str(exc), file=file, line=number)
            if on_bad_record == "error":
                raise err from exc
            data.skipped.append(err)
            (warn or LOG.warning)(f"skipped record: {err.one_line()}")
            continue
        data.sequences.extend(ChatSequence(number, text, spans) for text, spans in pieces)
    if not data.sequences:
        raise FusemergeError(f"no usable conversation among {data.records} records", file=file)
    return data


def _fit(
    messages: list[Message],
    tokenizer: Any,
    template: str,
    measure: ChatTokenizer,
    max_length: int,
    split_long: bool,
) -> list[tuple[str, tuple[Span, ...]]]:
    """The conversation as one or more texts of at most `max_length` tokens each."""
    text, spans = render_conversation(messages, tokenizer, template)
    if len(measure(ChatSequence(0, text, spans))[0]) <= max_length:
        return [(text, spans)]
    if not split_long:
        return [_truncate(text, spans, measure, max_length)]
    system = [m for m in messages[:1] if m["role"] == "system"]
    rounds: list[list[Message]] = []
    for m in messages[len(system) :]:
        if m["role"] == "user" or not rounds:
            rounds.append([])
        rounds[-1].append(m)
    pieces: list[tuple[str, tuple[Span, ...]]] = []
    i = 0
    while i < len(rounds):
        best = None
        j = i + 1
        while j <= len(rounds):
            chunk = system + [m for r in rounds[i:j] for m in r]
            if not any(m["role"] == "assistant" for m in chunk):
                j += 1
                continue
            rendered = render_conversation(chunk, tokenizer, template)
            if len(measure(ChatSequence(0, *rendered))[0]) > max_length:
                break
            best = (j, rendered)
            j += 1
        if best is None:  # one round alone is too long: keep its beginning
            j = min(j, len(rounds))
            chunk = system + [m for r in rounds[i:j] for m in r]
            if any(m["role"] == "assistant" for m in chunk):
                pieces.append(
                    _truncate(*render_conversation(chunk, tokenizer, template), measure, max_length)
                )
            i = j
        else:
            i, rendered = best
            pieces.append(rendered)
    pieces = [p for p in pieces if p[1]]
    if not pieces:
        raise BadRecord(f"no assistant text within max_length={max_length} pivot tokens")
    return pieces


def _truncate(
    text: str, spans: tuple[Span, ...], measure: ChatTokenizer, max_length: int
) -> tuple[str, tuple[Span, ...]]:
    """Cut the text before the token that would exceed `max_length`; spans are clipped.

    A fast tokenizer's offsets give the cut at a token boundary; retokenizing a prefix can merge
    differently at its end, so the cut moves back until the count fits. A slow one is bisected by character.
    """

    def fits(cut: int) -> bool:
        return len(measure(_clip(text, spans, cut))[0]) <= max_length

    if measure.fast:
        offsets = measure.offsets(text)
        keep = max_length - (1 if measure.bos is not None else 0)
        while keep > 0:
            cut = int(offsets[keep][0]) if keep < len(offsets) else len(text)
            if fits(cut):
                return _clip(text, spans, cut).text, _clip(text, spans, cut).spans
            keep -= 1
        return "", ()
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    clipped = _clip(text, spans, lo)
    return clipped.text, clipped.spans


def _clip(text: str, spans: tuple[Span, ...], cut: int) -> ChatSequence:
    return ChatSequence(0, text[:cut], tuple((s, min(e, cut)) for s, e in spans if s < cut))
