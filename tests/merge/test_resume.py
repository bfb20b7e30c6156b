"""A merge killed with SIGKILL leaves no incomplete shard under a final name, and the same command then
finishes it with a result byte-identical to an uninterrupted merge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusemerge.assets import build_random_model, perturb_model
from fusemerge.checkpoint.reader import read_safetensors_header


@pytest.fixture(scope="module")
def bigger_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    base = build_random_model(
        root / "base", vocab_size=8000, hidden_size=256, intermediate_size=768, num_layers=6, seed=3
    )
    return {
        "base": base,
        "ft1": perturb_model(base, root / "ft1", scale=0.01, seed=1),
        "ft2": perturb_model(base, root / "ft2", scale=0.02, seed=2),
    }


def _command(recipe: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fusemerge.cli",
        "merge",
        str(recipe),
        str(out),
        "--out-shard-size",
        "400KB",
        "-q",
    ]


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}


@pytest.mark.parametrize("method", ["ties", "variation_ratio"])
def test_kill_then_resume_is_byte_identical(method, bigger_family, tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: {method}\nbase_model: {bigger_family['base']}\nmodels:\n"
        f"  - model: {bigger_family['ft1']}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {bigger_family['ft2']}\n    parameters: {{weight: 0.4}}\n"
        + ("parameters: {density: 0.5}\n" if method == "ties" else "")
        + "dtype: bfloat16\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    reference = tmp_path / "reference"
    subprocess.run(_command(recipe, reference), check=True, env=env)

    out = tmp_path / "out"
    proc = subprocess.Popen(_command(recipe, out), env=env)
    deadline = time.monotonic() + 60
    while not list(out.glob("model-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors.index.json").exists(), "the merge finished before it could be killed"

    for shard in out.glob("model-*.safetensors"):  # every file under a final name is complete
        tensors, _ = read_safetensors_header(shard)
        assert shard.stat().st_size == max(t.end for t in tensors.values())

    result = subprocess.run(_command(recipe, out), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    assert _shards(out) == _shards(reference)
    assert (out / "model.safetensors.index.json").read_bytes() == (
        reference / "model.safetensors.index.json"
    ).read_bytes()
    assert not list(out.glob(".*.partial"))
