"""Data-parallel `sample`: two processes (torchrun, gloo on the CPU) split the shards and write the files
one process writes, reusing the shards a run already finished.

`accelerate launch --multi_gpu` starts its processes with this same launcher (torch.distributed.run); on
the CPU the launcher is used directly (as tests/fuse/test_fuse_e2e.py's data-parallel train test does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from implicit_helpers import math_prompts, write_jsonl

from fusemerge.checkpoint.layout import read_state
from fusemerge.fuse.pipeline import run_fuse
from tests.launcher import fuse_on_two_processes


def _recipe(tmp_path: Path, name: str, chat_models: dict[str, Path], prompts: Path) -> Path:
    body = {
        "pivot": str(chat_models["pivot"]),
        "sources": [str(chat_models["qwen"])],
        "dataset": {"path": str(prompts)},
        "fusion": {"kind": "implicit"},
        "implicit": {
            "sampling": {
                "samples": 2,
                "max_new_tokens": 5,
                "temperature": 1.0,
                "batch_size": 2,
                "shard_size": 2,
            },
            "scoring": {"default": "math_answer"},
        },
        "output": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.jsonl"))}


@pytest.mark.slow
def test_two_processes_sample_the_files_of_one_and_reuse_finished_shards(tmp_path, chat_models):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", math_prompts(8))  # 4 shards per model
    one = _recipe(tmp_path, "one", chat_models, prompts)
    run_fuse(one, steps=["sample"], progress=False, echo=lambda _: None)
    single = tmp_path / "one" / "work" / "implicit" / "samples"
    assert sorted(p.name for p in single.iterdir()) == ["pivot", "qwen-source"]

    # the two-process run starts from a half-finished pivot folder: shards 0 and 3 kept, 1 and 2 to do
    two = _recipe(tmp_path, "two", chat_models, prompts)
    parallel = tmp_path / "two" / "work" / "implicit" / "samples"
    shutil.copytree(single / "pivot", parallel / "pivot")
    for name in ("shard-00001.jsonl", "shard-00002.jsonl"):
        (parallel / "pivot" / name).unlink()
    kept = {
        n: (parallel / "pivot" / n).stat().st_mtime_ns for n in ("shard-00000.jsonl", "shard-00003.jsonl")
    }

    done = fuse_on_two_processes(two, "sample", OMP_NUM_THREADS="1")
    for model in ("pivot", "qwen-source"):
        assert _shards(parallel / model) == _shards(single / model), model
        state = read_state(parallel / model)
        assert state["complete"] is True and state["stats"]["processes"] == 2, state
        assert state["identity"] == read_state(single / model)["identity"]
    assert kept == {n: (parallel / "pivot" / n).stat().st_mtime_ns for n in kept}  # reused, not redone
    # the main process reports, once per model
    assert done.stdout.count("sample pivot: 2 of 4 shards, 8 samples to generate on 2 processes") == 1, (
        done.stdout
    )
    assert done.stdout.count("sample qwen-source: 4 of 4 shards") == 1, done.stdout
    lines = [json.loads(x) for x in (parallel / "qwen-source" / "shard-00001.jsonl").read_text().splitlines()]
    assert [line["sample_index"] for line in lines] == [0, 1, 0, 1]
