"""The I/O floor of a merge: read every input byte once and write the output's bytes, as plainly as Python can.

    python bench/io_floor.py OUT_DIR INPUT_FILE... --write-bytes 2200000000,...   # one output file per size

Reading: each input file once, front to back, `readinto` one reused 16 MiB buffer (no allocation, no
copies beyond the kernel's, from the page cache when the caller warmed it). Writing: one file per output
shard, `write` of that same buffer until the shard's size, then `fsync` and close, with the durability
fusemerge's shard writer gives its output: while a file is written a thread `fdatasync`s it every
`FLUSH_INTERVAL_S`, as the writer does, so the disk works during the writes rather than all at the closing
fsync (`--no-fsync`: leave it all to the kernel, as mergekit does; nothing is on disk when it returns).
No arithmetic: `merge_s / floor_s` says how much of a merge is not I/O. The floor reads, then writes; a
merge that overlaps the two on two cores can beat it.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from fusemerge.checkpoint.writer import FLUSH_INTERVAL_S

BUFFER = 16 << 20


def read_all(files: Iterable[Path], buffer: bytearray) -> int:
    """Read every byte of `files` into `buffer`, chunk after chunk; returns the bytes read."""
    view = memoryview(buffer)
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def write_all(folder: Path, sizes: Iterable[int], buffer: bytearray, *, fsync: bool) -> int:
    """Write one file of each size in `sizes` into `folder` from `buffer`; returns the bytes written."""
    view = memoryview(buffer)
    total = 0
    for i, size in enumerate(sizes):
        path = folder / f"floor-{i:05d}.bin"
        with open(path, "wb", buffering=0) as f:
            stop = threading.Event()
            flusher = threading.Thread(target=_flush_every, args=(f.fileno(), stop), daemon=True)
            if fsync and FLUSH_INTERVAL_S:
                flusher.start()
            left = size
            while left:
                left -= f.write(view[: min(left, len(view))])
            stop.set()
            if flusher.is_alive():
                flusher.join()
            if fsync:
                os.fsync(f.fileno())
        total += size
    return total


def _flush_every(fd: int, stop: threading.Event) -> None:
    """The shard writer's background flush: fdatasync `fd` every FLUSH_INTERVAL_S until `stop`."""
    while not stop.wait(FLUSH_INTERVAL_S):
        os.fdatasync(fd)


def measure_floor(inputs: list[Path], output_sizes: list[int], folder: Path, *, fsync: bool = True) -> dict:
    """Seconds to read `inputs` and to write files of `output_sizes` into `folder` (removed afterwards)."""
    buffer = bytearray(BUFFER)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    read = read_all(inputs, buffer)
    mid = time.perf_counter()
    try:
        written = write_all(folder, output_sizes, buffer, fsync=fsync)
        end = time.perf_counter()
    finally:
        for path in folder.glob("floor-*.bin"):
            path.unlink()
    return {
        "floor_read_s": round(mid - start, 4),
        "floor_write_s": round(end - mid, 4),
        "floor_s": round(end - start, 4),
        "floor_read_gb": round(read / 1e9, 3),
        "floor_write_gb": round(written / 1e9, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("inputs", type=Path, nargs="+")
    ap.add_argument("--write-bytes", required=True, help="comma-separated output file sizes")
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.write_bytes.split(",")]
    print(json.dumps(measure_floor(args.inputs, sizes, args.out_dir, fsync=not args.no_fsync)))


if __name__ == "__main__":
    main()
