"""A cheap content fingerprint of a model folder's weights: what a resume checks before reusing results.

Hashing 15 GB of weights would take minutes on every rerun; names and sizes alone miss weights that were
overwritten in place with the same shapes (a fine-tune saved over its base, a re-download of another
revision), so a store or target made from the old weights would be reused as if nothing changed. The
fingerprint hashes, per weight file:

- its name and size;
- a safetensors file's whole header (every tensor's name, dtype, shape and byte range);
- the whole data when the file is small (`WHOLE_FILE_BYTES`: every test model, every adapter), else a
  sample of it: `SAMPLE_BYTES` at the start, the middle and the end of every tensor (and, for pickle
  files, which have no header to follow, at `PICKLE_SAMPLES` evenly spaced offsets).

Reading ~3 KiB per tensor is a few hundred small reads for a 7B model, well under a second; any tensor
rewritten with other values changes its sampled bytes with near certainty (a change of a few isolated
elements in the middle of a large tensor can be missed: the price of not reading the whole file).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from fusemerge.checkpoint.layout import PICKLE_SUFFIXES
from fusemerge.checkpoint.reader import read_safetensors_header
from fusemerge.errors import FusemergeError

WHOLE_FILE_BYTES = 64 * 1024 * 1024
SAMPLE_BYTES = 1024
PICKLE_SAMPLES = 256
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def weights_fingerprint(folder: Path) -> str:
    """sha256 over the weight files directly in `folder` (safetensors and pickle formats), see above."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        h.update(file_digest(path))
    return h.hexdigest()


def file_digest(path: Path) -> bytes:
    """The sampled digest of one weight file (its whole content when it is small)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise FusemergeError(f"cannot read: {exc.strerror}", file=path) from exc
    try:
        if size <= WHOLE_FILE_BYTES:
            for start, end in _spans(0, size, block=16 * 1024 * 1024):
                h.update(_pread(fd, path, start, end))
        elif path.suffix == ".safetensors":
            (header_len,) = struct.unpack("<Q", _pread(fd, path, 0, 8))
            h.update(_pread(fd, path, 0, 8 + header_len))
            tensors, _ = read_safetensors_header(path)
            for info in sorted(tensors.values(), key=lambda t: t.start):
                for start in _sample_starts(info.start, info.end):
                    h.update(_pread(fd, path, start, min(start + SAMPLE_BYTES, info.end)))
        else:
            step = max(1, size // PICKLE_SAMPLES)
            for start in range(0, size, step):
                h.update(_pread(fd, path, start, min(start + SAMPLE_BYTES, size)))
    finally:
        os.close(fd)
    return h.digest()


def _sample_starts(start: int, end: int) -> list[int]:
    """Where the samples of a tensor's byte range begin: its start, middle and end (once each)."""
    middle = start + (end - start) // 2
    return sorted({start, max(start, middle - SAMPLE_BYTES // 2), max(start, end - SAMPLE_BYTES)})


def _spans(start: int, end: int, *, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, end)) for s in range(start, end, block)]


def _pread(fd: int, path: Path, start: int, end: int) -> bytes:
    try:
        data = os.pread(fd, end - start, start)
    except OSError as exc:
        raise FusemergeError(f"cannot read: {exc.strerror}", file=path) from exc
    if len(data) != end - start:
        raise FusemergeError(
            f"truncated file: expected bytes up to {end}, it has {start + len(data)}", file=path
        )
    return data
