"""Resource limits: a full disk ends with a clear message and keeps finished shards for a resume; peak
memory does not grow with the number of tensors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fusemerge.checkpoint.writer as writer_module
from fusemerge.errors import FusemergeError
from fusemerge.merge.api import run_merge
from fusemerge.offline.assets import build_random_model, perturb_model
from tests.faults.conftest import linear_recipe
from tests.merge.oracle import load_folder

ROOT = Path(__file__).parents[2]


def test_disk_full_mid_write_then_resume(small_family, tmp_path, monkeypatch):
    recipe = linear_recipe(tmp_path, small_family["ft1"], small_family["ft2"])
    reference = run_merge(
        recipe, tmp_path / "reference", out_shard_size=20_000, progress=False, echo=lambda _: None
    )

    real_pwrite = os.pwrite
    budget = {"bytes": 100_000}  # the 'disk' fills up after this many bytes

    def pwrite(fd: int, data, offset: int) -> int:
        if budget["bytes"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget["bytes"] -= len(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    out = tmp_path / "out"
    with pytest.raises(FusemergeError) as info:
        run_merge(recipe, out, out_shard_size=20_000, progress=False, echo=lambda _: None)
    message = info.value.one_line()
    assert "No space left on device" in message and "rerun to resume" in message
    done = list(out.glob(".*.done"))
    assert done, "shards finished before the disk filled up are kept"
    assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()

    monkeypatch.setattr(writer_module.os, "pwrite", real_pwrite)
    lines: list[str] = []
    run_merge(recipe, out, out_shard_size=20_000, progress=False, echo=lines.append)
    assert any(line.startswith(f"resuming: {len(done)} of") for line in lines)
    ours, theirs = load_folder(out), load_folder(reference)
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


# Peak RSS is read from the child's own /proc/self/status (VmHWM) at exit: a forked child's ru_maxrss would
# include the size of this (large) pytest process at fork time.
_MEASURE = """
import atexit, runpy, sys
path = sys.argv[1]
def report():
    with open(path, "w") as f:
        f.write(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
atexit.register(report)
sys.argv = ["fusemerge", *sys.argv[2:]]
runpy.run_module("fusemerge.cli", run_name="__main__")
"""


def _peak_rss_mb(recipe: Path, out: Path) -> float:
    report = out.parent / "peak.txt"
    cmd = [sys.executable, "-c", _MEASURE, str(report), "merge", str(recipe), str(out), "-q"]
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return int(report.read_text().split()[1]) / 1024


def test_peak_memory_does_not_grow_with_tensor_count(tmp_path):
    """16x the layers (and tensors, and bytes) must not mean more memory: tensors are streamed."""
    peaks = {}
    for layers in (2, 32):
        root = tmp_path / f"l{layers}"
        base = build_random_model(
            root / "base", vocab_size=1000, hidden_size=320, intermediate_size=960, num_layers=layers
        )
        ft = perturb_model(base, root / "ft", scale=0.01, seed=1)
        recipe = root / "recipe.yml"
        recipe.write_text(
            f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1, density: 0.5}}\n"
        )
        peaks[layers] = _peak_rss_mb(recipe, root / "out")
    model_mb = sum(f.stat().st_size for f in (tmp_path / "l32" / "base").glob("*.safetensors")) / 2**20
    assert model_mb > 150, model_mb  # the big model would visibly raise the peak if it were held
    print(f"peak RSS by layer count: {peaks}")
    assert peaks[32] < peaks[2] + 40, peaks
