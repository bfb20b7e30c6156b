"""The lazy catalog refuses corrupt files clearly; the streaming writer produces standard safetensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusemerge.checkpoint.dtypes import code_for_torch
from fusemerge.checkpoint.reader import ModelFolder
from fusemerge.checkpoint.writer import PlannedTensor, ShardedWriter, plan_shards
from fusemerge.errors import FusemergeError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 8, generator=g),
        "b.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "c.scalar": torch.tensor(3.0, dtype=torch.float16),
        "d.ids": torch.arange(5, dtype=torch.int64),
    }


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_catalog_reads_headers_and_tensors(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    folder = ModelFolder(tmp_path)
    assert set(folder.tensors) == set(tensors)
    for name, t in tensors.items():
        assert folder.tensors[name].shape == tuple(t.shape)
        assert torch.equal(folder.read(name), t)


def test_writer_roundtrip_through_safetensors(tmp_path):
    tensors = _tensors()
    planned = [PlannedTensor(n, code_for_torch(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(planned, max_shard_bytes=600)
    assert len(shards) == 2
    writer = ShardedWriter(tmp_path, shards)
    for name in reversed(list(tensors)):  # any order works: offsets come from the plan
        writer.write(name, tensors[name])
    assert not list(tmp_path.glob("model-*.safetensors")), "final names only once every shard is done"
    writer.publish()
    writer.write_index()
    assert writer.finished_shards() == {s.filename for s in shards}
    loaded = {}
    for shard in shards:
        loaded.update(load_file(tmp_path / shard.filename))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert set(ModelFolder(tmp_path).tensors) == set(tensors)
    assert not list(tmp_path.glob(".*.partial"))


def test_unfinished_shard_is_never_under_its_final_name(tmp_path):
    tensors = _tensors()
    planned = [PlannedTensor(n, code_for_torch(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(planned, max_shard_bytes=10**9)
    writer = ShardedWriter(tmp_path, shards)
    writer.write("a.weight", tensors["a.weight"])
    assert not (tmp_path / shards[0].filename).exists()
    assert writer.finished_shards() == set()
    writer.close()


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "needs 16"),
        ({"x": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 16, "unsupported dtype"),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
    ],
)
def test_corrupt_headers_are_refused(header, data, message, tmp_path):
    _write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(FusemergeError, match=message):
        ModelFolder(tmp_path)


def test_header_length_beyond_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(FusemergeError, match="declares 1000000 header bytes"):
        ModelFolder(tmp_path)


def test_invalid_header_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(FusemergeError, match="invalid JSON"):
        ModelFolder(tmp_path)


def test_index_naming_missing_shard(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FusemergeError, match="missing"):
        ModelFolder(tmp_path)


def test_tensor_in_two_shards(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FusemergeError, match="stored twice"):
        ModelFolder(tmp_path)


def test_no_weights_at_all(tmp_path):
    with pytest.raises(FusemergeError, match="no model weights"):
        ModelFolder(tmp_path)


def test_tensors_written_and_read_in_byte_ranges(tmp_path):
    """`write_part` in any order completes a tensor (and its shard) once all its bytes are in;
    `read_range` returns a tensor's stored bytes from any offset (the merge's elementwise stream)."""
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    folder = ModelFolder(tmp_path)
    planned = [PlannedTensor(n, code_for_torch(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(planned, 1 << 20)
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedWriter(out, shards)
    for name, t in reversed(tensors.items()):
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        chunk = bytearray(max(1, len(raw) // 3))
        parts = []
        for start in range(0, len(raw), len(chunk)):
            part = memoryview(chunk)[: min(len(chunk), len(raw) - start)]
            folder.read_range(name, start, part)
            assert bytes(part) == raw[start : start + len(part)]
            parts.append((start, bytes(part)))
        assert writer.finished_shards() == set()
        for start, data in reversed(parts):
            writer.write_part(name, start, memoryview(data))
    writer.publish()
    loaded = load_file(out / shards[0].filename)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="outside"):
        folder.read_range("a.weight", 500, memoryview(bytearray(100)))
    with pytest.raises(RuntimeError, match="outside"):
        ShardedWriter(out, shards).write_part("a.weight", 500, memoryview(bytearray(100)))


def test_shards_being_written_are_flushed_in_the_background(tmp_path, monkeypatch):
    """The disk writes while the merge computes (fdatasync every FLUSH_INTERVAL_S), not all at the
    closing fsync; the flushing thread ends with the writer."""
    import os
    import time

    from fusemerge.checkpoint import writer as writer_module

    synced: list[str] = []
    real = os.fdatasync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(writer_module, "FLUSH_INTERVAL_S", 0.01)
    monkeypatch.setattr(writer_module.os, "fdatasync", record)
    tensors = _tensors()
    planned = [PlannedTensor(n, code_for_torch(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan_shards(planned, 1 << 20))
    writer.write("a.weight", tensors["a.weight"])
    deadline = time.monotonic() + 5
    while not synced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert synced and synced[0].endswith(".partial")
    writer.close()
    assert writer._flusher is not None and not writer._flusher.is_alive()
