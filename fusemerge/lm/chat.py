"""Chat records: reading them, checking them into messages, and rendering them with a template.

FuseChat's rule is that every model reads the *same text*: the conversation rendered once with one chat
template, then tokenized by each model with its own tokenizer (`fusemerge.lm.tokens`). So the unit is a
`ChatSequence`: the rendered text plus the character spans of the assistant turns (content and the
end-of-turn marker that follows it, so a student learns to stop). Character spans are tokenizer-independent.

Records come from JSONL (one JSON object per line) or a `datasets.save_to_disk` folder, in OpenAI form
(`{"messages": [{"role", "content"}]}`) or ShareGPT form (`{"conversations": [{"from", "value"}]}`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusemerge.errors import FusemergeError

Span = tuple[int, int]
Message = dict[str, str]

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}


class BadRecord(ValueError):
    """A record that cannot become a conversation; the caller adds where it came from."""


@dataclass(frozen=True)
class ChatSequence:
    """One rendered conversation (or a piece of a split one), the same text for every model."""

    record: int  # line of the JSONL file, or row of the datasets folder (1-based)
    text: str
    spans: tuple[Span, ...]  # character ranges of assistant content + end-of-turn marker


# ---------------------------------------------------------------- records


def read_records(path: str | Path, split: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) pairs; a JSONL line that is not JSON comes back as a BadRecord.

    The messages name the fuse recipe's keys (`dataset.path`, `dataset.split`): eval reads through here too.
    """
    path = Path(path)
    if path.is_dir():
        yield from _dataset_rows(path, split)
    elif path.is_file():
        with path.open("rb") as fh:  # decoded per line: one bad byte is that line's fault, not a crash
            offset = 0
            for number, raw in enumerate(fh, start=1):
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield (
                        number,
                        BadRecord(
                            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte {start + exc.start} of the "
                            "file (re-encode it as UTF-8)"
                        ),
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, BadRecord(f"not valid JSON ({exc.msg})")
    else:
        raise FusemergeError(
            "dataset not found (a .jsonl file or a datasets folder)", file=path, key="dataset.path"
        )


def _dataset_rows(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise FusemergeError(f"not a datasets folder: {exc}", file=path, key="dataset.path") from exc
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        choice = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if choice not in names:
            raise FusemergeError(
                f"choose a split with dataset.split (has {names})", file=path, key="dataset.split"
            )
        ds = ds[choice]
    yield from enumerate(ds, start=1)


def conversation_messages(record: Any, fmt: str = "auto") -> list[Message]:
    """A record as [{"role", "content"}] with roles system/user/assistant; BadRecord if malformed."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(f"a record is a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = "openai" if "messages" in record else "sharegpt" if "conversations" in record else ""
        if not fmt:
            raise BadRecord("neither 'messages' (OpenAI) nor 'conversations' (ShareGPT) found")
    list_key, role_key, text_key = (
        ("messages", "role", "content") if fmt == "openai" else ("conversations", "from", "value")
    )
    turns = record.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"'{list_key}' must be a non-empty list")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"{list_key}[{i}] is not an object")
        role, content = turn.get(role_key), turn.get(text_key)
        if role is None:
            raise BadRecord(f"{list_key}[{i}] has no '{role_key}'")
        role = SHAREGPT_ROLES.get(str(role).lower()) if fmt == "sharegpt" else role
        if role not in ("system", "user", "assistant"):
            raise BadRecord(f"{list_key}[{i}] has unknown role {turn.get(role_key)!r}")
        if not isinstance(content, str):
            raise BadRecord(f"{list_key}[{i}].{text_key} must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRecord(f"{list_key}[{i}].{text_key} is empty")
        messages.append({"role": role, "content": content})
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first != "user":
        raise BadRecord("the conversation must start with a user turn (after an optional system message)")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn: nothing to learn from")
    return messages


# ---------------------------------------------------------------- rendering


def render_conversation(
    messages: list[Message], tokenizer: Any, template: str
) -> tuple[str, tuple[Span, ...]]:
    """Render with `template` and find each assistant turn's characters in the result.

    Templates may add text around the content (Qwen3 adds an empty think block) or strip its whitespace,
    so each assistant content is searched for, in order, after the previous one; the span then extends
    over a special token (end of turn, eos) that directly follows it.
    """
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception as exc:  # jinja raises its own errors (and templates call raise_exception)
        raise BadRecord(f"the chat template refused it: {exc}") from exc
    if not isinstance(text, str):
        raise BadRecord("the chat template did not return text")
    specials = _special_strings(tokenizer)
    spans: list[Span] = []
    cursor = 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = m["content"]
        start = text.find(content, cursor)
        if start < 0:
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise BadRecord("the chat template changed an assistant turn beyond whitespace; cannot locate it")
        end = start + len(content)
        marker = next((s for s in specials if text.startswith(s, end)), "")
        spans.append((start, end + len(marker)))
        cursor = end
    return text, tuple(spans)


def _special_strings(tokenizer: Any) -> list[str]:
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content))
    return sorted((s for s in found if s), key=len, reverse=True)
