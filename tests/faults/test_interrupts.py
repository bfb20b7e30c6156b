"""Interrupted work: SIGKILL at several points of a merge, then the same command, gives a byte-identical
model; a second merge into a folder being written is refused; a stale lock never blocks."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusemerge.offline.assets import build_random_model, perturb_model
from tests.faults.conftest import assert_one_line_exit_2, linear_recipe, run_merge_cli

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> tuple[Path, Path]:
    """A VaRM recipe over models big enough for ~20 output shards (so kills land mid-merge)."""
    root = tmp_path_factory.mktemp("interrupts")
    base = build_random_model(
        root / "base", vocab_size=4000, hidden_size=256, intermediate_size=768, num_layers=6, seed=5
    )
    ft1 = perturb_model(base, root / "ft1", scale=0.01, seed=1)
    ft2 = perturb_model(base, root / "ft2", scale=0.02, seed=2)
    recipe = root / "recipe.yml"
    recipe.write_text(
        f"merge_method: variation_ratio\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
        "parameters: {granularity: layer}\ndtype: bfloat16\n"
    )
    reference = root / "reference"
    subprocess.run(_cmd(recipe, reference), check=True, env=_env())
    return recipe, reference


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cmd(recipe: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fusemerge.cli",
        "merge",
        str(recipe),
        str(out),
        "--out-shard-size",
        "300KB",
        "-q",
    ]


def _model_files(out: Path) -> dict[str, bytes]:
    names = [
        *sorted(out.glob("model-*.safetensors")),
        out / "model.safetensors.index.json",
        out / "config.json",
    ]
    return {p.name: p.read_bytes() for p in names}


def _kill_when(out: Path, done_shards: int, delay: float) -> None:
    proc = subprocess.Popen(_cmd(out.parent / "recipe.yml", out), env=_env())
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list(out.glob(".*.done"))) >= done_shards:
            break
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# (finished shards to wait for, extra random delay): before planning ends, early, midway, late.
KILL_POINTS = [
    (0, random.Random(1).uniform(0.2, 1.0)),
    (1, 0.0),
    (6, random.Random(2).uniform(0, 0.02)),
    (14, 0.0),
]


@pytest.mark.parametrize(("done_shards", "delay"), KILL_POINTS)
def test_sigkill_then_rerun_is_byte_identical(done_shards, delay, many_shards, tmp_path):
    recipe, reference = many_shards
    (tmp_path / "recipe.yml").write_text(recipe.read_text())
    out = tmp_path / "out"
    _kill_when(out, done_shards, delay)
    assert not (out / "model.safetensors.index.json").exists(), (
        "finished before the kill: make the model bigger"
    )
    assert not list(out.glob("model-*.safetensors")), "an unfinished merge must not show final model files"
    # A second kill on the resumed run, then a clean finish.
    _kill_when(out, done_shards + 2, 0.0)
    result = subprocess.run(_cmd(tmp_path / "recipe.yml", out), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _model_files(out) == _model_files(reference)
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*.done"))


def test_second_merge_into_busy_folder_is_refused(small_family, tmp_path):
    out = tmp_path / "out"
    (out / ".fusemerge").mkdir(parents=True)
    recipe = linear_recipe(tmp_path, small_family["ft1"], small_family["ft2"])
    with open(out / ".fusemerge" / "lock", "w") as held:  # a live merge holds this lock
        held.write("12345")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        line = assert_one_line_exit_2(run_merge_cli(recipe, out))
        assert "another merge is writing" in line and "12345" in line
    assert run_merge_cli(recipe, out).exit_code == 0


def test_stale_lock_of_dead_process_is_recovered(small_family, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    (out / ".fusemerge").mkdir(parents=True)
    (out / ".fusemerge" / "lock").write_text(str(dead.pid))
    recipe = linear_recipe(tmp_path, small_family["ft1"], small_family["ft2"])
    assert run_merge_cli(recipe, out).exit_code == 0
    assert (out / "model.safetensors.index.json").is_file()
