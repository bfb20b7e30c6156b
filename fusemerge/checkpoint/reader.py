"""A model folder as a lazy catalog of tensors, built from safetensors headers alone.

Opening a 15 GB model reads a few kilobytes: each shard's JSON header. Every header is checked against the
file (lengths, byte ranges, overlaps, dtypes) before anything trusts it, because a truncated download or a
hostile file must end in a clear error, not a crash or a silent wrong tensor. Tensor data is read later, one
tensor at a time, with `os.preadv` straight into a fresh torch buffer: no mmap pages linger in the resident
set, so memory stays bounded by the tensors in flight rather than by model size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusemerge.checkpoint.dtypes import ITEM_SIZE, name_for_code, torch_dtype
from fusemerge.checkpoint.layout import INDEX_NAME, PICKLE_SUFFIXES
from fusemerge.errors import FusemergeError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code ('BF16'), shape, absolute byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns (tensors, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FusemergeError(
                    "not a safetensors file: shorter than its 8-byte header length", file=path
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise FusemergeError(
                    f"corrupt safetensors header: declares {header_len} header bytes but the file has {size}",
                    file=path,
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise FusemergeError(f"cannot read: {exc.strerror}", file=path) from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FusemergeError(f"corrupt safetensors header: invalid JSON ({exc})", file=path) from exc
    if not isinstance(header, dict):
        raise FusemergeError("corrupt safetensors header: not a JSON object", file=path)

    data_start = 8 + header_len
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_len)
    _check_no_overlap(path, tensors)
    return tensors, metadata if isinstance(metadata, dict) else {}


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise FusemergeError(
            "corrupt safetensors header: entry lacks dtype/shape/data_offsets", file=path, tensor=name
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_SIZE:
        raise FusemergeError(f"unsupported dtype '{dtype}'", file=path, tensor=name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise FusemergeError(f"corrupt safetensors header: bad shape {shape!r}", file=path, tensor=name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FusemergeError(
            f"corrupt safetensors header: bad data_offsets {offsets!r}", file=path, tensor=name
        )
    expected = math.prod(shape) * ITEM_SIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise FusemergeError(
            f"corrupt safetensors header: {offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape "
            f"{shape} (needs {expected})",
            file=path,
            tensor=name,
        )
    if offsets[1] > data_len:
        raise FusemergeError(
            f"truncated file: tensor data ends at byte {data_start + offsets[1]} but the file has "
            f"{data_start + data_len} bytes",
            file=path,
            tensor=name,
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, prev_end, prev_name), (start, _, name) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise FusemergeError(
                f"corrupt safetensors header: bytes overlap tensor '{prev_name}'", file=path, tensor=name
            )


class ModelFolder:
    """A Hugging Face model folder: `config.json` plus one safetensors file or shards with an index."""

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        if not self.path.exists():
            raise FusemergeError("model folder not found", file=self.path)
        if not self.path.is_dir():
            raise FusemergeError("expected a model folder, found a file", file=self.path)
        self.tensors: dict[str, TensorInfo] = {}
        self._pickle_state: dict[str, torch.Tensor] | None = None
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._catalog()

    # -- catalog ---------------------------------------------------------------------------------
    def _catalog(self) -> None:
        index = self.path / INDEX_NAME
        if index.is_file():
            self._catalog_from_index(index)
            return
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            for file in files:
                self._add_file(file)
            return
        pickles = sorted(p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickles:
            if not self.allow_pickle:
                raise FusemergeError(
                    f"only pickle checkpoints ({pickles[0].name}) here; pickle files can run code when loaded. "
                    "Convert to safetensors, or pass --allow-pickle if you trust this model",
                    file=self.path,
                )
            self._catalog_pickles(pickles)
            return
        raise FusemergeError("no model weights here (no *.safetensors files)", file=self.path)

    def _catalog_from_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FusemergeError(f"unreadable index ({exc})", file=index) from exc
        for shard in sorted(set(weight_map.values())):
            shard_path = self.path / shard
            if not shard_path.is_file():
                raise FusemergeError(f"the index names shard '{shard}', which is missing", file=index)
            self._add_file(shard_path)
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                raise FusemergeError(
                    f"the index places this tensor in '{shard}', which does not hold it",
                    file=index,
                    tensor=name,
                )

    def _add_file(self, file: Path) -> None:
        tensors, _ = read_safetensors_header(file)
        for name, info in tensors.items():
            if name in self.tensors:
                raise FusemergeError(
                    f"tensor stored twice: also in '{self.tensors[name].file.name}'", file=file, tensor=name
                )
            self.tensors[name] = info

    def _catalog_pickles(self, files: list[Path]) -> None:
        import torch

        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                loaded = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise FusemergeError(f"cannot load pickle checkpoint ({exc})", file=file) from exc
            for name, tensor in loaded.items():
                if name in state:
                    raise FusemergeError("tensor stored twice", file=file, tensor=name)
                state[name] = tensor
                code = str(tensor.dtype).removeprefix("torch.")
                from fusemerge.checkpoint.dtypes import code_for_name

                dtype = code_for_name(code)
                nbytes = tensor.numel() * ITEM_SIZE[dtype]
                self.tensors[name] = TensorInfo(name, file, dtype, tuple(tensor.shape), 0, nbytes)
        self._pickle_state = state

    # -- metadata --------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict[str, Any] | None:
        """The parsed `config.json`, or None where the folder has none."""
        path = self.path / "config.json"
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FusemergeError(f"config.json is not valid JSON ({exc})", file=path) from exc
        if not isinstance(config, dict):
            raise FusemergeError("config.json is not a JSON object", file=path)
        return config

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype_name(self, name: str) -> str:
        return name_for_code(self.tensors[name].dtype)

    # -- data ------------------------------------------------------------------------------------
    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into a fresh, writable CPU tensor of its stored dtype, or into the front of
        `out` (a uint8 CPU tensor of at least its bytes): a reused buffer spares the page fault per 4 KiB
        that fresh memory costs, which made reads several times slower than the page cache serves them."""
        import torch

        info = self.tensors[name]
        if self._pickle_state is not None:
            return self._pickle_state[name].clone()
        buffer = out[: info.nbytes] if out is not None else torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._pread(name, 0, memoryview(buffer.numpy()))
        return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)

    def stored_bytes(self, name: str) -> bool:
        """Whether `read_range` can serve `name`: its bytes in a safetensors file are the tensor as is
        (not a pickle checkpoint's, and not changed on the way by a subclass, as a LoRA fold does)."""
        return self._pickle_state is None and type(self).read is ModelFolder.read and name in self.tensors

    def read_range(self, name: str, start: int, out: memoryview) -> None:
        """Fill `out` with the tensor's stored bytes from byte `start` of its data on: the elementwise
        merges stream a tensor through a small buffer that stays in the CPU cache, chunk after chunk,
        as the I/O floor does (`fusemerge.merge.elementwise`); only where `stored_bytes(name)`."""
        info = self.tensors[name]
        if start < 0 or start + len(out) > info.nbytes:
            raise ValueError(f"{name}: bytes {start}..{start + len(out)} outside its {info.nbytes}")
        self._pread(name, start, out)

    def _pread(self, name: str, start: int, out: memoryview) -> None:
        """Fill `out` from byte `start` of tensor `name`'s data, however many reads the kernel needs."""
        info = self.tensors[name]
        fd = self._fd(info.file)
        done = 0
        while done < len(out):
            got = os.preadv(fd, [out[done:]], info.start + start + done)
            if got <= 0:
                raise FusemergeError(
                    "file ended while reading (was it truncated?)", file=info.file, tensor=name
                )
            done += got

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(file, os.O_RDONLY)
                except OSError as exc:
                    raise FusemergeError(f"cannot open: {exc.strerror}", file=file) from exc
                self._fds[file] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, {len(self.tensors)} tensors)"
