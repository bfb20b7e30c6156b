"""The top-K store: one model's next-token top-K log-probs for every position of every sequence, on disk.

Layout of a store folder:

    manifest.json                 identity (model, tokenizer hash, dataset hash, K, ...), shard plan, status
    shard-00000.safetensors       sequences [0, shard_size)
    shard-00001.safetensors       sequences [shard_size, 2 * shard_size) ...

Each shard is a plain safetensors file holding
    ids        int32   [tokens, K]   token ids of the K most likely next tokens, most likely first
    logprobs   float16 [tokens, K]   their log-probabilities (log_softmax computed in float32)
    offsets    int64   [sequences + 1]  row range of each sequence inside the shard
    metric_ce  float32 [sequences]  mean cross-entropy over the sequence's assistant tokens (FuseChat)
    ce_per_byte float32 [sequences] the same summed NLL divided by the UTF-8 bytes of the assistant text
                                    (eval's measure, comparable across tokenizers; NaN: none)
Row t of a sequence is the distribution at position t, i.e. over the token that follows token t; every
position is kept (not only assistant ones) so alignment can walk whole sequences. 60 bytes per token at
K=10 plus 16 bytes per sequence, against FuseLLM's Arrow lists of float32 (about 100).

An *aligned* store (a source's distributions moved into the pivot's positions and vocabulary) uses the same
format with identity `kind: aligned`, `positions: pivot`, `vocab: pivot`; there, id -1 marks an empty
slot (fewer than K distinct pivot ids, or no teacher distribution at that position).

Shards are the unit of resumption: the sequences of a shard are fixed by the plan (not by batch order or
process count), a shard is written under a temporary name and renamed when complete, and a rerun computes
only the missing ones. Reading memory-maps the arrays straight from the safetensors files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusemerge.checkpoint.layout import publish, stale_tmp_siblings, tmp_sibling, usual_file_mode
from fusemerge.errors import FusemergeError

# 2: ce_per_byte per sequence (fusion.metric). Bump when a shard's arrays change: older stores are refused
STORE_FORMAT = "fusemerge-topk/2"
STORE_FORMAT_PREFIX = "fusemerge-topk/"
MANIFEST = "manifest.json"
_DTYPES = {"I32": np.int32, "F16": np.float16, "I64": np.int64, "F32": np.float32}


@dataclass(frozen=True)
class TopKSequence:
    """One sequence's slice of a store (memory-mapped views)."""

    ids: np.ndarray  # int32 [tokens, K]
    logprobs: np.ndarray  # float16 [tokens, K]
    metric_ce: float  # nats per assistant token of the model that made the store
    ce_per_byte: float  # nats per UTF-8 byte of the assistant text, the same NLL

    def metric(self, name: str) -> float:
        """The sequence's value of `fusion.metric`: ce_per_token (the paper's) or ce_per_byte."""
        if name == "ce_per_token":
            return self.metric_ce
        if name == "ce_per_byte":
            return self.ce_per_byte
        raise ValueError(f"unknown metric {name!r} (ce_per_token or ce_per_byte)")


class TopKStore:
    """A store folder: create or resume it for writing, or open a finished one for reading."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------ opening

    @classmethod
    def create_or_resume(
        cls, path: str | Path, identity: dict[str, Any], *, n_sequences: int, shard_size: int
    ) -> TopKStore:
        """Open the store for (re)writing; a store made for anything else is refused, never reused.

        Args:
            path: the store folder (created if missing).
            identity: what the values depend on (model, tokenizer, dataset, K, dtype, ...): JSON values.
            n_sequences: sequences in the dataset; shard j holds [j * shard_size, (j + 1) * shard_size).
            shard_size: sequences per shard.
        """
        path = Path(path)
        plan = {"n_sequences": n_sequences, "shard_size": shard_size}
        wanted = {"format": STORE_FORMAT, "identity": identity, **plan}
        if (path / MANIFEST).is_file():
            manifest = _read_manifest(path)
            differences = _differences(manifest, wanted)
            if differences:
                raise FusemergeError(
                    f"this top-K store was made for other data or settings ({'; '.join(differences)}), "
                    "perhaps by another recipe: give this recipe its own work_dir",
                    file=path,
                )
            store = cls(path, manifest)
        else:
            if path.exists() and any(path.iterdir()):
                raise FusemergeError(
                    f"folder is not empty and has no {MANIFEST}; not a top-K store", file=path
                )
            path.mkdir(parents=True, exist_ok=True)
            store = cls(path, {**wanted, "complete": False})
            store._write_manifest()
        for stale in stale_tmp_siblings(path):  # shards of an interrupted run, never complete
            stale.unlink(missing_ok=True)
        return store

    @classmethod
    def open(cls, path: str | Path, *, identity: dict[str, Any] | None = None) -> TopKStore:
        """Open a complete store for reading; with `identity`, refuse one made for something else."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise FusemergeError(f"not a top-K store (no {MANIFEST})", file=path)
        manifest = _read_manifest(path)
        if identity is not None:
            differences = _differences(manifest, {"identity": identity})
            if differences:
                raise FusemergeError(f"top-K store does not match: {'; '.join(differences)}", file=path)
        store = cls(path, manifest)
        if not store.complete:
            missing = len(store.pending_shards())
            raise FusemergeError(
                f"top-K store is unfinished ({missing} shards missing); rerun the teach step", file=path
            )
        return store

    # ------------------------------------------------------------ plan and status

    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest["identity"]

    @property
    def n_sequences(self) -> int:
        return int(self.manifest["n_sequences"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_sequences // self.shard_size)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def shard_sequences(self, shard: int) -> range:
        """The dataset sequences that shard `shard` holds, in order."""
        return range(shard * self.shard_size, min(self.n_sequences, (shard + 1) * self.shard_size))

    def shard_file(self, shard: int) -> Path:
        return self.path / f"shard-{shard:05d}.safetensors"

    def pending_shards(self) -> list[int]:
        return [j for j in range(self.n_shards) if not self.shard_file(j).is_file()]

    # ------------------------------------------------------------ writing

    def write_shard(
        self,
        shard: int,
        ids: Sequence[np.ndarray],
        logprobs: Sequence[np.ndarray],
        metric_ce: Sequence[float],
        *,
        ce_per_byte: Sequence[float],
    ) -> Path:
        """Write one shard: per sequence of `shard_sequences(shard)`, its [tokens, K] ids and log-probs,
        its nats per assistant token (`metric_ce`) and per assistant-text byte (`ce_per_byte`).

        The file appears under its final name only when complete (write, fsync, rename).
        """
        from safetensors.numpy import save_file

        count = len(self.shard_sequences(shard))
        k = int(self.identity["top_k"])
        if not (len(ids) == len(logprobs) == len(metric_ce) == len(ce_per_byte) == count):
            raise ValueError(
                f"shard {shard} needs {count} sequences, got "
                f"{len(ids)}/{len(logprobs)}/{len(metric_ce)}/{len(ce_per_byte)}"
            )
        for a, b in zip(ids, logprobs, strict=True):
            if a.shape != b.shape or a.ndim != 2 or a.shape[1] != k:
                raise ValueError(f"expected [tokens, {k}] ids and logprobs, got {a.shape} and {b.shape}")
        lengths = np.asarray([len(a) for a in ids], dtype=np.int64)
        tensors = {
            "ids": np.ascontiguousarray(np.concatenate(ids).astype(np.int32, copy=False)),
            "logprobs": np.ascontiguousarray(np.concatenate(logprobs).astype(np.float16, copy=False)),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "metric_ce": np.asarray(metric_ce, dtype=np.float32),
            "ce_per_byte": np.asarray(ce_per_byte, dtype=np.float32),
        }
        final = self.shard_file(shard)
        tmp = tmp_sibling(final)
        # one metadata key only: safetensors writes a map's keys in an order that varies between processes,
        # and a resumed store must be byte-identical to an uninterrupted one
        save_file(tensors, str(tmp), metadata={"format": STORE_FORMAT})
        usual_file_mode(tmp)  # safetensors writes 0600
        _fsync(tmp)
        publish(tmp, final)
        return final

    def finalize(self) -> bool:
        """Mark the store complete once every shard exists; records each shard's token count."""
        if self.pending_shards():
            return False
        shards = []
        for j in range(self.n_shards):
            header = _header(self.shard_file(j))
            shards.append({"file": self.shard_file(j).name, "tokens": int(header["ids"]["shape"][0])})
        self.manifest = {**self.manifest, "complete": True, "shards": shards}
        self._write_manifest()
        return True

    def _write_manifest(self) -> None:
        final = self.path / MANIFEST
        tmp = tmp_sibling(final)
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        publish(tmp, final)

    # ------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self.n_sequences

    def shard_arrays(self, shard: int) -> dict[str, np.ndarray]:
        """The arrays of a shard, memory-mapped (read-only)."""
        if shard not in self._shards:
            self._shards[shard] = _memmap_safetensors(self.shard_file(shard))
        return self._shards[shard]

    def sequence(self, index: int) -> TopKSequence:
        if not 0 <= index < self.n_sequences:
            raise IndexError(f"sequence {index} outside [0, {self.n_sequences})")
        shard, row = divmod(index, self.shard_size)
        arrays = self.shard_arrays(shard)
        a, b = int(arrays["offsets"][row]), int(arrays["offsets"][row + 1])
        return TopKSequence(
            arrays["ids"][a:b],
            arrays["logprobs"][a:b],
            float(arrays["metric_ce"][row]),
            float(arrays["ce_per_byte"][row]),
        )

    def metric_ce(self) -> np.ndarray:
        """Every sequence's metric_ce (nats per token), in dataset order (the paper's MinCE compares these)."""
        return self.metric("ce_per_token")

    def metric(self, name: str) -> np.ndarray:
        """Every sequence's `fusion.metric` (ce_per_token | ce_per_byte), in dataset order."""
        key = {"ce_per_token": "metric_ce", "ce_per_byte": "ce_per_byte"}.get(name)
        if key is None:
            raise ValueError(f"unknown metric {name!r} (ce_per_token or ce_per_byte)")
        return np.concatenate([self.shard_arrays(j)[key] for j in range(self.n_shards)])

    def n_tokens(self) -> int:
        return sum(int(_header(self.shard_file(j))["ids"]["shape"][0]) for j in range(self.n_shards))

    def bytes_per_token(self) -> float:
        """Bytes on disk (shards and manifest) per stored token position."""
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return size / max(1, self.n_tokens())


def store_bytes_per_token(path: str | Path) -> float:
    """Bytes on disk per token of a store folder (finished or not: only written shards count)."""
    store = TopKStore(Path(path), _read_manifest(Path(path)))
    done = [j for j in range(store.n_shards) if store.shard_file(j).is_file()]
    tokens = sum(int(_header(store.shard_file(j))["ids"]["shape"][0]) for j in done)
    size = sum(store.shard_file(j).stat().st_size for j in done) + (store.path / MANIFEST).stat().st_size
    return size / max(1, tokens)


# ---------------------------------------------------------------- helpers


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FusemergeError(f"unreadable {MANIFEST}: {exc}", file=path) from exc
    found = manifest.get("format")
    if found != STORE_FORMAT:
        if isinstance(found, str) and found.startswith(STORE_FORMAT_PREFIX):
            raise FusemergeError(
                f"top-K store of an older format ({found}, now {STORE_FORMAT}: it lacks ce_per_byte); "
                "delete this folder and rerun `fusemerge fuse RECIPE --steps teach,align`",
                file=path,
            )
        raise FusemergeError(f"not a {STORE_FORMAT} store (format {found!r})", file=path)
    return manifest


def _differences(have: dict[str, Any], want: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: store has A, now B' for every differing leaf of `want` (nested dicts are walked)."""
    out = []
    for key, value in want.items():
        old = have.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out += _differences(old, value, f"{prefix}{key}.")
        elif old != value:
            out.append(f"{prefix}{key}: store has {_short(old)}, now {_short(value)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def _header(file: Path) -> dict[str, Any]:
    return _header_and_start(file)[0]


def _header_and_start(file: Path) -> tuple[dict[str, Any], int]:
    with file.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size)), 8 + size


def _memmap_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Zero-copy views of a safetensors file's arrays (the format is a JSON header then raw data)."""
    header, start = _header_and_start(file)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(file, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return arrays


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
