"""Helpers for the implicit-fusion training tests, and a worker that runs `preference` in its own process.

    python tests/fuse/implicit/train_helpers.py '{"pivot": ..., "policy": ..., "pairs": ..., ...}'

The worker is what the kill -9 test kills: the same recipe as the tests build, read from one JSON argument,
with an optional pause after each checkpoint so that the test can kill it between two steps for sure.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusemerge.fuse.implicit.spec import ImplicitSpec
from fusemerge.fuse.recipe import ModelSpec, TrainingSpec


@dataclass(frozen=True)
class Recipe:
    """The parts of an implicit fuse recipe the training half reads (`target.ImplicitRecipe`)."""

    pivot: ModelSpec
    training: TrainingSpec
    implicit: ImplicitSpec
    sources: list[ModelSpec] = field(default_factory=lambda: [ModelSpec(model="org/source-a")])
    chat_template: str = "chatml"
    raw_yaml: str = "fusion: {kind: implicit}\n"


def make_recipe(pivot: str, *, mode: str = "full", steps: int = 3, **preference: Any) -> Recipe:
    """A small recipe: a few steps of batch 2, a checkpoint every step, a high learning rate (tiny models)."""
    training = TrainingSpec(
        mode=mode,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        batch_size=2,
        gradient_accumulation=1,
        max_steps=steps,
        save_steps=1,
        logging_steps=1,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        seed=7,
    )
    pref = {
        "loss": "dpo",
        "beta": 0.5,
        "learning_rate": 5e-3,
        "max_steps": steps,
        "max_length": 96,
    } | preference
    implicit = ImplicitSpec(scoring={"default": "math_answer"}, preference=pref)
    return Recipe(pivot=ModelSpec(model=pivot), training=training, implicit=implicit)


def sft_rows(count: int) -> list[dict]:
    """Arithmetic conversations: a program can check every answer."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i + 3}?"},
                {"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."},
            ]
        }
        for i in range(count)
    ]


def preference_rows(count: int, *, start: int = 100) -> list[dict]:
    """Pairs in TRL's conversational format: a right answer (source and target style) against a wrong one."""
    rows = []
    for i in range(start, start + count):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {i} plus {i + 3}?"}],
                "chosen": [{"role": "assistant", "content": f"The sum is {2 * i + 3}."}],
                "rejected": [{"role": "assistant", "content": f"I believe it is {2 * i + 7}, roughly."}],
                "chosen_target": [{"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _worker(args: dict[str, Any]) -> None:
    from transformers import TrainerCallback

    from fusemerge.fuse.implicit.datasets import read_preference_data
    from fusemerge.fuse.implicit.preference import run_preference
    from fusemerge.fuse.implicit.spec import DataFileSpec

    class PauseAfterSave(TrainerCallback):
        def on_save(self, *_: Any, **__: Any) -> None:
            time.sleep(args.get("pause_s", 0.0))

    recipe = make_recipe(args["pivot"], mode=args.get("mode", "full"), steps=args["steps"], loss=args["loss"])
    pairs = read_preference_data(spec=DataFileSpec(path=args["pairs"]))
    run_preference(
        recipe=recipe,
        pairs=pairs,
        policy=args["policy"],
        out=Path(args["out"]),
        checkpoints=Path(args["checkpoints"]),
        progress=False,
        callbacks=[PauseAfterSave()],
    )


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
