"""bench/merge_bench.py on tiny models: one JSON line per method, every run and both floors in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.scripts import BENCH_DIR, load_bench


def test_a_small_run_prints_the_best_runs_and_both_floors(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH_DIR / "merge_bench.py"),
            *("--workdir", str(tmp_path), "--hidden", "64", "--layers", "2", "--intermediate", "128"),
            *("--vocab", "512", "--heads", "4", "--methods", "linear,task_arithmetic"),
            *("--skip-mergekit", "--repeats", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["method"] for line in lines] == ["linear", "task_arithmetic"]
    for line in lines:
        assert line["fusemerge_ok"] and line["repeats"] == 2 and len(line["fusemerge_runs_s"]) == 2
        assert line["fusemerge_s"] == min(line["fusemerge_runs_s"])
        assert line["floor_s"] == min(line["floor_runs_s"]) and line["floor_write_s"] > 0
        assert line["x_floor"] > 0 and line["x_floor_median"] > 0
        assert line["floor_nofsync_s"] > 0 and line["x_floor_nofsync"] > 0
    assert not list(tmp_path.glob("out-*")) and not list((tmp_path / "floor").iterdir())


def test_the_floor_writes_the_sizes_asked_and_leaves_nothing(tmp_path):
    floor = load_bench("io_floor")
    inputs = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for i, path in enumerate(inputs):
        path.write_bytes(bytes([i]) * (3 << 20))
    for fsync in (True, False):
        measured = floor.measure_floor(inputs, [5 << 20, 1 << 20], tmp_path / "out", fsync=fsync)
        assert measured["floor_read_gb"] == round((6 << 20) / 1e9, 3)
        assert measured["floor_write_gb"] == round((6 << 20) / 1e9, 3)
        assert not list(Path(tmp_path / "out").iterdir())
