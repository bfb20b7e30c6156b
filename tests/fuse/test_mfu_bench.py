"""bench/mfu_bench.py runs on the CPU in CI size: one JSON line per stage, numbers that hold together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_mfu_bench_runs_tiny_on_the_cpu():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "mfu_bench.py"),
            "--size",
            "tiny",
            "--sequences",
            "12",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--max-length",
            "256",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [x["stage"] for x in lines] == ["teacher", "full", "lora"]
    for x in lines:
        assert x["device"] == "cpu" and x["peak_tflops"] is None and x["mfu"] is None
        assert x["tokens"] > 0 and x["seconds"] > 0
        assert abs(x["tokens_per_s"] - x["tokens"] / x["seconds"]) <= 0.01 * x["tokens_per_s"] + 0.1
        assert 0.0 <= x["padding_fraction"] < 1.0 and x["peak_memory_mib"] > 0
    teacher, full, lora = lines
    assert teacher["tokens"] >= 12 * 16  # every sequence, at least the shortest length each
    assert full["steps_timed"] == lora["steps_timed"] == 2
