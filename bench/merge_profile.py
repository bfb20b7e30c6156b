"""Where a streaming merge's time goes: reads, compute, writes, page-cache misses, thread hand-offs.

    python bench/merge_profile.py --methods linear,ties,dare_ties,sce     # bench/merge_bench.py's models

Runs `fusemerge.merge.api.run_merge` in this process on bench/merge_bench.py's models and recipes (built
there once) and prints one JSON line per method:
  wall_s, cpu_user_s, cpu_sys_s     the process's clock and CPU times (cpu / wall > 1: stages overlapped)
  read_s, compute_s, write_s        time inside ModelFolder.read (summed over the reader threads),
                                    merge_tensor (main thread), ShardedWriter.write (writer thread)
  wait_inputs_s                     main thread blocked waiting for the reader (input hand-off); in the
                                    elementwise stream (streamed_chunks > 0), for a free result buffer
  wait_writer_s                     main thread blocked handing a result to the writer (queue full)
  disk_read_gb, cached_read_gb      /proc/self/io read_bytes (from the device: page-cache misses) and
                                    rchar - read_bytes (served from the page cache)
  threads                           CPU seconds per thread (from /proc/self/task), by thread name
  top                               the main thread's cProfile, top functions by own time
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import queue
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import merge_bench

TICK = os.sysconf("SC_CLK_TCK")


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _thread_cpu() -> dict[int, float]:
    cpu = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return cpu


class Sampler(threading.Thread):
    """Every 0.2 s, CPU seconds of each live thread, named by Python's thread names."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="profile-sampler")
        self.stop = threading.Event()
        self.first = _thread_cpu()  # CPU spent before the merge (imports) is not the merge's
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.sample()

    def sample(self) -> None:
        for t in threading.enumerate():
            if t.native_id is not None:
                self.names[t.native_id] = t.name
        self.last.update(_thread_cpu())

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for tid, seconds in self.last.items():
            name = self.names.get(tid, "other")
            out[name.split("_")[0]] += seconds - self.first.get(tid, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _timed(owner, attr: str, bucket: dict[str, float], key: str, lock: threading.Lock):
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            with lock:
                bucket[key] += elapsed

    setattr(owner, attr, wrapper)
    return original


def profile_one(recipe: Path, out: Path, top: int) -> dict:
    from fusemerge.checkpoint.reader import ModelFolder
    from fusemerge.checkpoint.writer import ShardedWriter
    from fusemerge.merge import api, elementwise, engine

    bucket: dict[str, float] = defaultdict(float)
    lock = threading.Lock()
    patched = [
        (ModelFolder, "read", _timed(ModelFolder, "read", bucket, "read_s", lock)),
        (ShardedWriter, "write", _timed(ShardedWriter, "write", bucket, "write_s", lock)),
        (engine, "merge_tensor", _timed(engine, "merge_tensor", bucket, "compute_s", lock)),
        # the elementwise stream (linear, task arithmetic): chunk reads, chunk writes, kernel calls
        (ModelFolder, "read_range", _timed(ModelFolder, "read_range", bucket, "read_s", lock)),
        (ShardedWriter, "write_part", _timed(ShardedWriter, "write_part", bucket, "write_s", lock)),
    ]
    original_kernel = elementwise.chunk_kernel

    def chunk_kernel(*args, **kwargs):
        kernel = original_kernel(*args, **kwargs)
        if kernel is None:
            return None

        def timed(*a):
            start = time.perf_counter()
            try:
                return kernel(*a)
            finally:
                bucket["compute_s"] += time.perf_counter() - start
                bucket["streamed_chunks"] += 1

        return timed

    elementwise.chunk_kernel = chunk_kernel
    patched.append((elementwise, "chunk_kernel", original_kernel))
    main_id = threading.get_ident()
    original_get, original_put = queue.Queue.get, engine._put

    def get(self, *args, **kwargs):  # only the main thread's waits on the reader count as hand-offs
        if threading.get_ident() != main_id:
            return original_get(self, *args, **kwargs)
        start = time.perf_counter()
        try:
            return original_get(self, *args, **kwargs)
        finally:
            bucket["wait_inputs_s"] += time.perf_counter() - start

    def put(q, item, stage):
        start = time.perf_counter()
        try:
            return original_put(q, item, stage)
        finally:
            bucket["wait_writer_s"] += time.perf_counter() - start

    queue.Queue.get, engine._put = get, put
    sampler = Sampler()
    sampler.start()
    io0, times0, start = _io(), os.times(), time.perf_counter()
    profiler = cProfile.Profile()
    try:
        profiler.enable()
        api.run_merge(recipe, out, overwrite=True, progress=False, echo=lambda _: None)
        profiler.disable()
    finally:
        wall = time.perf_counter() - start
        io1, times1 = _io(), os.times()
        sampler.sample()
        sampler.stop.set()
        queue.Queue.get, engine._put = original_get, original_put
        for owner, attr, original in patched:
            if original is not None:
                setattr(owner, attr, original)
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    disk = io1["read_bytes"] - io0["read_bytes"]
    return {
        "wall_s": round(wall, 2),
        "cpu_user_s": round(times1.user - times0.user, 2),
        "cpu_sys_s": round(times1.system - times0.system, 2),
        **{k: round(v, 2) for k, v in sorted(bucket.items())},
        "disk_read_gb": round(disk / 1e9, 3),
        "cached_read_gb": round((io1["rchar"] - io0["rchar"] - disk) / 1e9, 3),
        "written_gb": round((io1["wchar"] - io0["wchar"]) / 1e9, 3),
        "threads": sampler.by_name(),
        "top": [f"{func[2]} ({Path(func[0]).name}:{func[1]}) {row[2]:.2f}s" for func, row in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,sce")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = merge_bench.build_models(args.workdir / "models", args)
    for method in args.methods.split(","):
        recipe = args.workdir / f"{method}.yml"
        recipe.write_text(merge_bench.RECIPES[method].format(**{k: str(v) for k, v in paths.items()}))
        merge_bench.warm(paths)
        out = args.workdir / f"out-profile-{method}"
        line = {"bench": "merge_profile", "method": method, **profile_one(recipe, out, args.top)}
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
