"""Helpers shared by the implicit-fusion tests (a module, since conftest files are not imported by name)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def math_prompts(count: int) -> list[dict]:
    """Addition questions with gold answers (domain math), and one instruction prompt per three."""
    records: list[dict] = []
    for i in range(count):
        if i % 3 == 2:
            records.append(
                {"messages": [{"role": "user", "content": f"Write one line about the number {i}."}]}
            )
        else:
            records.append(
                {
                    "messages": [{"role": "user", "content": f"What is {i} + {2 * i}?"}],
                    "domain": "math",
                    "answer": str(3 * i),
                }
            )
    return records
