"""Prompt records for implicit fusion: what every model answers in `sample`, and what a verifier checks.

A prompt record is a chat record (OpenAI `messages` or ShareGPT `conversations`) that the models reply
to: everything up to and including its last user turn. A full conversation is accepted too (its trailing
assistant turns are dropped), so the chat data of explicit fusion can be reused as prompts. Optional
fields:

- `domain`: picks the scorer (`scoring.domains`); default `general`.
- `answer`: the gold final answer of a math prompt (`math_answer`).
- `tests`: Python test code (a string, or a list of strings) for a code prompt (`code_tests`).
- `prompt_id` (or `id`): a stable name; default: a hash of the prompt's messages, so the id of a prompt
  never depends on its line number and a reordered file keeps its samples' meaning.

A prompt that appears twice (same id) is kept once: sampling it twice would only weight it double.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from fusemerge.errors import FusemergeError

Message = dict[str, str]
DEFAULT_DOMAIN = "general"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt the models answer; `messages` ends with the user turn the reply answers."""

    prompt_id: str
    messages: tuple[Message, ...]
    domain: str = DEFAULT_DOMAIN
    answer: str | None = None
    tests: str | None = None
    record: int = 0  # line of the JSONL file (or row of the datasets folder), for messages

    def as_json(self) -> dict[str, Any]:
        """The fields a stage file repeats, so that a score or pair line is readable on its own."""
        return {"prompt_id": self.prompt_id, "domain": self.domain, "prompt": list(self.messages)}


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a run in file order, plus what was skipped and why."""

    prompts: tuple[PromptRecord, ...]
    skipped: tuple[FusemergeError, ...] = ()
    duplicates: int = 0

    def fingerprint(self) -> str:
        """sha256 of every prompt (id, messages, domain, answer, tests): binds a stage folder to its prompts."""
        return prompts_hash(self.prompts)

    def by_id(self) -> dict[str, PromptRecord]:
        return {p.prompt_id: p for p in self.prompts}


def prompts_hash(prompts: Iterable[PromptRecord]) -> str:
    """sha256 over the prompts in order; any change to a prompt, its gold answer or tests changes it."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(
            json.dumps([p.prompt_id, p.messages, p.domain, p.answer, p.tests], ensure_ascii=False).encode()
        )
        h.update(b"\0")
    return h.hexdigest()


def prompt_id_of(messages: Iterable[Message]) -> str:
    """A stable id from the prompt's messages alone (16 hex digits of sha256: collisions are negligible)."""
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prompt_messages(record: Any, *, fmt: str = "auto") -> list[Message]:
    """The messages a model replies to: the record's turns up to its last user turn.

    The record is parsed by the same reader as explicit fusion's chat data
    (`fusemerge.lm.chat.conversation_messages`), which insists on an assistant turn; a prompt has none
    yet, so the turns are given a placeholder reply that is removed again. Errors are `BadRecord`.

    Args:
        record: one JSON object of the prompts file.
        fmt: `auto`, `openai` or `sharegpt`, as `dataset.format`.
    """
    from fusemerge.lm.chat import BadRecord, conversation_messages

    if not isinstance(record, dict):
        return conversation_messages(record, fmt)  # raises the reader's own error for a non-object
    list_key = _list_key(record, fmt)
    turns = record.get(list_key)
    if not isinstance(turns, list):
        return conversation_messages(record, fmt)  # the reader's own message
    placeholder = (
        {"role": "assistant", "content": "-"} if list_key == "messages" else {"from": "gpt", "value": "-"}
    )
    messages = conversation_messages(
        {list_key: [*turns, placeholder]}, "openai" if list_key == "messages" else "sharegpt"
    )
    messages = messages[:-1]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise BadRecord("no user turn: nothing to answer")
    return messages[: last_user + 1]


def _list_key(record: dict, fmt: str) -> str:
    if fmt == "openai" or (fmt == "auto" and "messages" in record):
        return "messages"
    if fmt == "sharegpt" or (fmt == "auto" and "conversations" in record):
        return "conversations"
    return "messages"


def parse_prompt(record: Any, *, number: int, fmt: str = "auto") -> PromptRecord:
    """One prompt record from one JSON object; `BadRecord` names the field at fault.

    Args:
        record: the JSON object.
        number: its line (or row), kept for messages.
        fmt: `auto`, `openai` or `sharegpt`.
    """
    from fusemerge.lm.chat import BadRecord

    messages = prompt_messages(record, fmt=fmt)
    domain = record.get("domain", DEFAULT_DOMAIN)
    if not isinstance(domain, str) or not domain.strip():
        raise BadRecord(f"'domain' must be a non-empty string, got {domain!r}")
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise BadRecord(f"'answer' must be a string or a number, got {type(answer).__name__}")
    tests = record.get("tests")
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        tests = "\n".join(tests)
    if tests is not None and not isinstance(tests, str):
        raise BadRecord("'tests' must be a string of Python code or a list of such strings")
    given = record.get("prompt_id", record.get("id"))
    if given is not None and not isinstance(given, str | int):
        raise BadRecord(f"'prompt_id' must be a string or an integer, got {type(given).__name__}")
    return PromptRecord(
        prompt_id=str(given) if given is not None else prompt_id_of(messages),
        messages=tuple(messages),
        domain=domain.strip(),
        answer=None if answer is None else str(answer),
        tests=tests,
        record=number,
    )


def read_prompts(
    *,
    path: str,
    split: str | None = None,
    fmt: Literal["auto", "openai", "sharegpt"] = "auto",
    limit: int | None = None,
    on_bad_record: Literal["skip", "error"] = "skip",
) -> PromptSet:
    """Every prompt of a JSONL file or `datasets` folder, in order, without duplicates.

    Args:
        path: the prompts file (`dataset.path`).
        split: the split of a saved DatasetDict (`dataset.split`).
        fmt: the record format (`dataset.format`).
        limit: keep only the first N prompts (`dataset.limit`).
        on_bad_record: `skip` (reported in `PromptSet.skipped`) or `error` (the first one raises).
    """
    from fusemerge.lm.chat import BadRecord, read_records

    prompts: list[PromptRecord] = []
    seen: set[str] = set()
    skipped: list[FusemergeError] = []
    duplicates = 0
    for number, record in read_records(path, split):
        try:
            prompt = parse_prompt(record, number=number, fmt=fmt)
        except BadRecord as exc:
            error = FusemergeError(str(exc), file=path, line=number)
            if on_bad_record == "error":
                raise error from None
            skipped.append(error)
            continue
        if prompt.prompt_id in seen:
            duplicates += 1
            continue
        seen.add(prompt.prompt_id)
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise FusemergeError("no usable prompt in the dataset", file=path, key="dataset.path")
    return PromptSet(tuple(prompts), tuple(skipped), duplicates)
