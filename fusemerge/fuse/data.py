"""Chat data for the teacher pass: records -> rendered text + assistant character spans -> per-model tokens.

FuseChat's rule is that every model reads the *same text*: the conversation rendered once with the pivot's
chat template, then tokenized by each model with its own tokenizer. So the unit here is a `ChatSequence`:
the rendered text plus the character spans of the assistant turns (content and the end-of-turn marker that
follows it, so the student learns to stop). A `ChatTokenizer` turns it into one model's token ids and an
assistant-token mask.

Why character spans: they are tokenizer-independent. A fast tokenizer's `return_offsets_mapping` gives each
token's characters; a token is an assistant token when its characters overlap a span. Slow tokenizers have
no offsets, so the text is cut at span boundaries and each piece tokenized alone; pieces then never share a
token, which can differ from tokenizing the whole text at the boundaries (usually a space or newline).

Length: `max_length` counts *pivot* tokens and is applied once, here, so all models see identical texts.
With `split_long` (FuseChat's choice) a long conversation is cut between rounds (a user turn and the
replies after it) into several sequences, each repeating the system message; a single round that is still
too long, or any long conversation without `split_long`, is truncated at a pivot token boundary.

Records come from JSONL (one JSON object per line) or a `datasets.save_to_disk` folder, in OpenAI form
(`{"messages": [{"role", "content"}]}`) or ShareGPT form (`{"conversations": [{"from", "value"}]}`).
A malformed record is reported with its line (or row) and skipped or fatal by `dataset.on_bad_record`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusemerge.errors import FusemergeError
from fusemerge.fuse.recipe import DatasetSpec

LOG = logging.getLogger(__name__)

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

# Built-in templates for pivots whose tokenizer has none (or to override it): `chat_template: <name>`.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # openchat_3.5, FuseChat's pivot: "GPT4 Correct User: ...<|end_of_turn|>GPT4 Correct Assistant: ..."
    "openchat": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '<|end_of_turn|>' }}"
        "{% else %}{{ 'GPT4 Correct ' + ('User' if m['role'] == 'user' else 'Assistant') + ': ' + m['content']"
        " + '<|end_of_turn|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
    ),
}


class BadRecord(ValueError):
    """A record that cannot become a conversation; the caller adds where it came from."""


@dataclass(frozen=True)
class ChatSequence:
    """One rendered conversation (or a piece of a split one), the same text for every model."""

    record: int  # line of the JSONL file, or row of the datasets folder (1-based)
    text: str
    spans: tuple[Span, ...]  # character ranges of assistant content + end-of-turn marker


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


# ---------------------------------------------------------------- records


def read_records(spec: DatasetSpec) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) pairs; a JSONL line that is not JSON comes back as a BadRecord."""
    path = Path(spec.path)
    if path.is_dir():
        yield from _dataset_rows(path, spec.split)
    elif path.is_file():
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
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


def resolve_chat_template(name: str, pivot_tokenizer: Any) -> str:
    """The Jinja template that renders every conversation: the pivot's own, a built-in name, or a file."""
    if name == "pivot":
        template = getattr(pivot_tokenizer, "chat_template", None)
        if not template:
            raise FusemergeError(
                f"the pivot's tokenizer has no chat template; set chat_template to one of "
                f"{sorted(BUILTIN_TEMPLATES)} or a .jinja file",
                key="chat_template",
            )
        return (
            template if isinstance(template, str) else template.get("default", next(iter(template.values())))
        )
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    path = Path(name)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise FusemergeError(
        f"unknown chat template '{name}': use 'pivot', one of {sorted(BUILTIN_TEMPLATES)}, or a .jinja file",
        key="chat_template",
    )


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


# ---------------------------------------------------------------- tokenizing


class ChatTokenizer:
    """One model's view of a ChatSequence: token ids and the assistant-token mask.

    The text is tokenized without special tokens (the template already wrote them as text), and the
    model's BOS is put in front when its tokenizer adds one to plain text, as it did in training.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and len(full) > len(plain) and full[0] == bos else None

    def __call__(self, seq: ChatSequence) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], mask bool [n]); mask[t] is True where token t belongs to an assistant turn.

        Row t of this model's top-K store is the distribution at token t (over token t + 1).
        """
        ids, mask, _ = self.with_offsets(seq)
        return ids, mask

    def with_offsets(self, seq: ChatSequence) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, mask, offsets int64 [n, 2] or None for slow tokenizers); a prepended BOS has (0, 0).

        The offsets are what token alignment by character spans ("offsets") needs.
        """
        offsets = None
        if self.fast:
            enc = self.tokenizer(seq.text, add_special_tokens=False, return_offsets_mapping=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(ids), dtype=bool)
            for start, end in seq.spans:
                mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        else:
            ids, mask = self._by_segments(seq)
        if self.bos is not None and (len(ids) == 0 or ids[0] != self.bos):
            ids = np.concatenate([np.asarray([self.bos], dtype=np.int64), ids])
            mask = np.concatenate([np.zeros(1, dtype=bool), mask])
            if offsets is not None:
                offsets = np.concatenate([np.zeros((1, 2), dtype=np.int64), offsets])
        return ids, mask, offsets

    def _by_segments(self, seq: ChatSequence) -> tuple[np.ndarray, np.ndarray]:
        cuts = sorted({0, len(seq.text), *(p for span in seq.spans for p in span)})
        ids: list[int] = []
        mask: list[bool] = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            piece = self.tokenizer(seq.text[a:b], add_special_tokens=False)["input_ids"]
            inside = any(s <= a and b <= e for s, e in seq.spans)
            ids.extend(piece)
            mask.extend([inside] * len(piece))
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)

    def offsets(self, text: str) -> np.ndarray:
        """Character offsets of each token of `text` (fast tokenizers only), without a BOS."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


# ---------------------------------------------------------------- the dataset


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
    template = resolve_chat_template(chat_template, pivot_tokenizer)
    measure = ChatTokenizer(pivot_tokenizer)
    data = ChatData(sequences=[])
    for number, record in read_records(spec):
        if spec.limit is not None and data.records >= spec.limit:
            break
        data.records += 1
        try:
            messages = conversation_messages(record, spec.format)
            pieces = _fit(messages, pivot_tokenizer, template, measure, spec)
        except BadRecord as exc:
            err = FusemergeError(str(exc), file=spec.path, line=number)
            if spec.on_bad_record == "error":
                raise err from exc
            data.skipped.append(err)
            (warn or LOG.warning)(f"skipped record: {err.one_line()}")
            continue
        data.sequences.extend(ChatSequence(number, text, spans) for text, spans in pieces)
    if not data.sequences:
        raise FusemergeError(f"no usable conversation among {data.records} records", file=spec.path)
    return data


def _fit(
    messages: list[Message], tokenizer: Any, template: str, measure: ChatTokenizer, spec: DatasetSpec
) -> list[tuple[str, tuple[Span, ...]]]:
    """The conversation as one or more texts of at most `max_length` pivot tokens each."""
    text, spans = render_conversation(messages, tokenizer, template)
    if len(measure(ChatSequence(0, text, spans))[0]) <= spec.max_length:
        return [(text, spans)]
    if not spec.split_long:
        return [_truncate(text, spans, measure, spec.max_length)]
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
            if len(measure(ChatSequence(0, *rendered))[0]) > spec.max_length:
                break
            best = (j, rendered)
            j += 1
        if best is None:  # one round alone is too long: keep its beginning
            j = min(j, len(rounds))
            chunk = system + [m for r in rounds[i:j] for m in r]
            if any(m["role"] == "assistant" for m in chunk):
                pieces.append(
                    _truncate(*render_conversation(chunk, tokenizer, template), measure, spec.max_length)
                )
            i = j
        else:
            i, rendered = best
            pieces.append(rendered)
    pieces = [p for p in pieces if p[1]]
    if not pieces:
        raise BadRecord(f"no assistant text within max_length={spec.max_length} pivot tokens")
    return pieces


def _truncate(
    text: str, spans: tuple[Span, ...], measure: ChatTokenizer, max_length: int
) -> tuple[str, tuple[Span, ...]]:
    """Cut the text before the pivot token that would exceed `max_length`; spans are clipped.

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
