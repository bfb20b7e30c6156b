"""The fusion demo's data: two real domains, split once with a fixed seed into disjoint parts.

- **code**: top-level blocks of the Python standard library's own modules, as chat records where the user
  asks for code and the assistant answers with it.
- **chat**: real English conversations from `chatterbot-corpus`.

Each domain is split into four disjoint parts, so that no number in the demo's table comes from text a
model was trained on:

    specialist  plain text the domain's source specialist is pre-trained on (the most of it)
    pivot       plain text of the pivot's light, general pre-training (a little of each domain)
    fusion      chat records of the small mixed set that `fuse` runs over (teachers and students)
    heldout     chat records that only `eval` reads

The specialists see several times more of their domain than the pivot: that is the knowledge fusion has to
move into the pivot, through the teachers' distributions on the fusion set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from fusemerge.checkpoint.layout import atomic_write_text
from fusemerge.offline.corpora import chatterbot_conversations, stdlib_code_blocks

DOMAINS = ("code", "chat")
# The chat format of every demo model: plain "User:" / "Assistant:" lines that every tokenizer reads as
# ordinary text. Pre-training texts are conversations in this format too, so the specialists know it, as
# real chat models know theirs (FuseChat renders everything with the pivot's template).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ ('User: ' if m['role'] == 'user' else 'Assistant: ') + m['content'] + '\\n\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
CODE_PROMPTS = (
    "Show me some code from the Python standard library module `{module}`.",
    "Write Python code like the standard library's `{module}.py`.",
    "What does a piece of `{module}` from the standard library look like?",
    "Give me an excerpt of the `{module}` module's source.",
)


@dataclass(frozen=True)
class Split:
    """How many records of one domain go to each part; the rest of the domain is left unused."""

    heldout: int
    fusion: int
    pivot: int
    specialist: int


@dataclass(frozen=True)
class CorpusPlan:
    """The demo's data sizes. Defaults keep the whole demo within minutes on two CPU cores."""

    code: Split = Split(heldout=70, fusion=120, pivot=60, specialist=420)
    chat: Split = Split(heldout=120, fusion=200, pivot=80, specialist=495)
    code_max_chars: int = 1000
    seed: int = 0


@dataclass
class Corpus:
    """Plain pre-training texts per part and domain, plus the two chat files that `fuse` and `eval` read."""

    texts: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # part -> domain -> texts
    fusion_file: Path = Path()
    heldout_file: Path = Path()

    def pretraining_texts(self, part: str, domains: tuple[str, ...] = DOMAINS) -> list[str]:
        """The plain texts of one part, domains interleaved in a fixed order."""
        out: list[str] = []
        for domain in domains:
            out.extend(self.texts[part][domain])
        random.Random(len(out)).shuffle(out)
        return out


def code_records(plan: CorpusPlan) -> list[dict]:
    """Standard library code as chat records, the user asking for a module's code."""
    rng = random.Random(plan.seed)
    records = []
    for module, code in stdlib_code_blocks(max_chars=plan.code_max_chars, seed=plan.seed):
        prompt = rng.choice(CODE_PROMPTS).format(module=module)
        records.append(
            {
                "domain": "code",
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": code}],
            }
        )
    return records


def chat_records() -> list[dict]:
    """chatterbot-corpus English conversations as chat records of the domain "chat"."""
    return [{"domain": "chat", "messages": c["messages"]} for c in chatterbot_conversations("english")]


def record_text(record: dict) -> str:
    """A record as pre-training text: exactly what CHAT_TEMPLATE renders (checked by the tests)."""
    return "".join(
        ("User: " if m["role"] == "user" else "Assistant: ") + m["content"] + "\n\n"
        for m in record["messages"]
    )


def unique_records(records: list[dict]) -> list[dict]:
    """The records without repeats (chatterbot repeats conversations across topics, the standard library
    repeats some blocks): a repeat split across parts would leak held-out or fusion text into training."""
    seen: set[str] = set()
    out = []
    for r in records:
        key = "\0".join(m["content"].strip() for m in r["messages"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def build_corpus(folder: str | Path, plan: CorpusPlan = CorpusPlan()) -> Corpus:
    """Split both domains and write `fusion.jsonl` and `heldout.jsonl` under `folder` (same files each run)."""
    folder = Path(folder)
    corpus = Corpus(texts={part: {} for part in ("pivot", "specialist")})
    chat: dict[str, list[dict]] = {"fusion": [], "heldout": []}
    for domain, records, split in (
        ("code", code_records(plan), plan.code),
        ("chat", chat_records(), plan.chat),
    ):
        records = unique_records(records)
        random.Random(plan.seed).shuffle(records)
        need = split.heldout + split.fusion + split.pivot + split.specialist
        if len(records) < need:
            raise ValueError(f"the {domain} domain has {len(records)} records, the demo's split needs {need}")
        a = split.heldout
        b = a + split.fusion
        c = b + split.pivot
        chat["heldout"] += records[:a]
        chat["fusion"] += records[a:b]
        corpus.texts["pivot"][domain] = [record_text(r) for r in records[b:c]]
        corpus.texts["specialist"][domain] = [record_text(r) for r in records[c : c + split.specialist]]
    random.Random(plan.seed).shuffle(chat["fusion"])
    corpus.fusion_file = folder / "fusion.jsonl"
    corpus.heldout_file = folder / "heldout.jsonl"
    for records, path in ((chat["fusion"], corpus.fusion_file), (chat["heldout"], corpus.heldout_file)):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return corpus
