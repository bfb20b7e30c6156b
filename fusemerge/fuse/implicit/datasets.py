"""The data the training half of implicit fusion reads: SFT conversations and preference pairs.

Both come from the `pairs` step's stage files (`<work_dir>/implicit/sft.jsonl`, `preference.jsonl`) or from
prepared data a user brings (`implicit.sft_data`, `implicit.preference_data`): a JSONL file or a
`datasets.save_to_disk` folder, e.g. FuseChat-3.0's released SFT and DPO sets saved as JSONL. Either way
the records are checked here, once, before any weights are loaded, and a bad one stops the run with one
line naming the file, its line (or row) and the recipe key: training for hours on a silently shrunken
dataset is worse than fixing one record.

SFT records are chat conversations: OpenAI `messages` (or ShareGPT `conversations`), the loss is on the
assistant turns. Preference records are in the formats TRL's DPOTrainer reads, normalised here to one of
two shapes so that the trainer sees a single format per run:

- conversational: `prompt` a list of messages ending with a user turn, `chosen` / `rejected` lists of
  assistant messages. Accepted as given; with a string `prompt` (wrapped as one user turn); with the
  prompt implicit in `chosen` and `rejected` (full conversations sharing a prefix, as in UltraFeedback
  and FuseChat-3.0's released DPO set, where a string `prompt`, if present, merely repeats the user turn);
  or with string responses after a conversational prompt (wrapped as one assistant turn).
- standard: `prompt`, `chosen`, `rejected` plain strings (text the user already rendered).

WRPO also needs `chosen_target`, the pivot's own best response to the prompt (its on-policy sample), in
the same shape as `chosen`; the other losses ignore it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.spec import DataFileSpec
from fusemerge.lm.chat import BadRecord, conversation_messages, read_records

Message = dict[str, str]
Turns = list[Message] | str  # conversational (messages) or standard (plain text)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SftRecord:
    """One SFT conversation and where it came from (the JSONL line or the datasets row, 1-based)."""

    line: int
    messages: list[Message]


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair, normalised (see the module docstring); `conversational` says which shape."""

    line: int
    prompt: Turns
    chosen: Turns
    rejected: Turns
    chosen_target: Turns | None = None

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    def as_row(self, *, with_target: bool = False) -> dict[str, Any]:
        """The pair as TRL's DPOTrainer reads it.

        Args:
            with_target: add `chosen_target` (WRPO).
        """
        row: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if with_target:
            row["chosen_target"] = self.chosen_target
        return row


def read_sft_data(*, spec: DataFileSpec, key: str = "implicit.sft_data") -> list[SftRecord]:
    """Every SFT conversation of a JSONL file or datasets folder; the first bad record is an error.

    Args:
        spec: the file (or folder), the split of a saved DatasetDict, and an optional record limit.
        key: the recipe key the data came from, named in errors.
    """
    records: list[SftRecord] = []
    for line, record in _rows(spec, key):
        try:
            messages = conversation_messages(record)
        except BadRecord as exc:
            raise FusemergeError(str(exc), file=spec.path, line=line, key=key) from None
        records.append(SftRecord(line, messages))
        if spec.limit and len(records) >= spec.limit:
            break
    if not records:
        raise FusemergeError("no SFT records", file=spec.path, key=key)
    return records


def read_preference_data(
    *, spec: DataFileSpec, key: str = "implicit.preference_data"
) -> list[PreferencePair]:
    """Every preference pair of a JSONL file or datasets folder, normalised; the first bad record is an error.

    Args:
        spec: the file (or folder), the split of a saved DatasetDict, and an optional record limit.
        key: the recipe key the data came from, named in errors.
    """
    pairs: list[PreferencePair] = []
    for line, record in _rows(spec, key):
        try:
            pair = preference_pair(record=record, line=line)
        except BadRecord as exc:
            raise FusemergeError(str(exc), file=spec.path, line=line, key=key) from None
        if pairs and pair.conversational != pairs[0].conversational:
            shape = "conversational" if pairs[0].conversational else "standard (plain text)"
            raise FusemergeError(
                f"mixes formats: line {pairs[0].line} is {shape}, this one is not",
                file=spec.path,
                line=line,
                key=key,
            )
        pairs.append(pair)
        if spec.limit and len(pairs) >= spec.limit:
            break
    if not pairs:
        raise FusemergeError("no preference pairs", file=spec.path, key=key)
    return pairs


def preference_pair(*, record: Any, line: int = 0) -> PreferencePair:
    """One record as a normalised PreferencePair; BadRecord (naming the record key) if it cannot be one.

    Args:
        record: a decoded JSON object (or a BadRecord from the reader, re-raised).
        line: where it came from, kept on the pair.
    """
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(f"a record is a JSON object, got {type(record).__name__}")
    for name in ("chosen", "rejected"):
        if name not in record or record[name] is None:
            raise BadRecord(f"no '{name}'")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    target = record.get("chosen_target")
    if isinstance(chosen, str) and isinstance(rejected, str) and (prompt is None or isinstance(prompt, str)):
        if prompt is None:
            raise BadRecord("'prompt' is missing (plain-text chosen/rejected need an explicit prompt)")
        _text(prompt, "prompt")
        _text(chosen, "chosen")
        _text(rejected, "rejected")
        if target is not None:
            _text(target, "chosen_target")
        return PreferencePair(line, prompt, chosen, rejected, target)

    chosen_turns, rejected_turns = _turns(chosen, "chosen"), _turns(rejected, "rejected")
    if isinstance(prompt, list):
        prompt_turns = _messages(prompt, "prompt")
    elif chosen_turns[0]["role"] != "assistant":  # the prompt is implicit in both conversations
        prompt_turns = _common_prefix(chosen_turns, rejected_turns)
        chosen_turns, rejected_turns = chosen_turns[len(prompt_turns) :], rejected_turns[len(prompt_turns) :]
    elif isinstance(prompt, str):
        prompt_turns = [{"role": "user", "content": _text(prompt, "prompt")}]
    else:
        raise BadRecord("'prompt' is missing and 'chosen' holds only the response")
    if not prompt_turns or prompt_turns[-1]["role"] != "user":
        raise BadRecord("the prompt must end with a user turn")
    chosen_turns = _responses(chosen_turns, prompt_turns, "chosen")
    rejected_turns = _responses(rejected_turns, prompt_turns, "rejected")
    target_turns = None
    if target is not None:
        target_turns = _responses(_turns(target, "chosen_target"), prompt_turns, "chosen_target")
    return PreferencePair(line, prompt_turns, chosen_turns, rejected_turns, target_turns)


def _rows(spec: DataFileSpec, key: str) -> Iterator[tuple[int, Any]]:
    """(line or row, record) of the file or folder; reading problems name this recipe key."""
    if not Path(spec.path).exists():
        raise FusemergeError("not found (a .jsonl file or a datasets folder)", file=spec.path, key=key)
    try:
        yield from read_records(spec.path, spec.split)
    except FusemergeError as exc:
        suffix = ".split" if exc.key and exc.key.endswith(".split") else ""
        raise FusemergeError(exc.message, file=spec.path, key=key + suffix) from None


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"'{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord(f"'{name}' is empty")
    return value


def _turns(value: Any, name: str) -> list[Message]:
    """Messages, or a plain string taken as one assistant turn (a response after a chat prompt)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, name)}]
    return _messages(value, name)


def _messages(value: Any, name: str) -> list[Message]:
    if isinstance(value, dict):  # some exports store a single message as an object
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRecord(f"'{name}' must be a non-empty list of messages or a string")
    out: list[Message] = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRecord(f"'{name}[{i}]' is not an object")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise BadRecord(f"'{name}[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise BadRecord(f"'{name}[{i}].content' must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRecord(f"'{name}[{i}].content' is empty")
        out.append({"role": role, "content": content})
    return out


def _common_prefix(a: list[Message], b: list[Message]) -> list[Message]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    # the responses start at the first assistant turn after the shared prefix's last user turn
    while n and a[n - 1]["role"] == "assistant":
        n -= 1
    if n == 0:
        raise BadRecord("'chosen' and 'rejected' share no prompt (give 'prompt' as a list of messages)")
    return a[:n]


def _responses(turns: list[Message], prompt: list[Message], name: str) -> list[Message]:
    """The response turns: `turns` after the prompt when it repeats it (a full conversation), else as given."""
    if len(turns) > len(prompt) and turns[: len(prompt)] == prompt:
        turns = turns[len(prompt) :]
    if not turns:
        raise BadRecord(f"'{name}' has no response after the prompt")
    if turns[0]["role"] != "assistant":
        raise BadRecord(f"'{name}' must start with an assistant turn, got {turns[0]['role']!r}")
    return turns
