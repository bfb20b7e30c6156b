"""The engine's reused read buffers: reused by size, bounded, and never handed out while still written."""

from __future__ import annotations

import time

import torch

from fusemerge.checkpoint.writer import ShardedWriter
from fusemerge.merge.api import run_merge
from fusemerge.merge.buffers import BufferPool
from tests.merge.oracle import load_folder


def test_a_given_back_buffer_is_reused_for_the_same_size():
    pool = BufferPool(limit=1 << 20)
    first = pool.take(1000)
    pool.give(first)
    assert pool.take(1000) is first
    assert pool.take(1000) is not first  # in use: a new one


def test_idle_buffers_are_freed_before_memory_passes_the_limit():
    pool = BufferPool(limit=10_000)
    small = [pool.take(3000) for _ in range(3)]
    for buf in small:
        pool.give(buf)
    assert pool.idle_bytes == 9000
    big = pool.take(8000)  # a size not idle: idle ones go first, oldest first, so 8000 + idle fits
    assert pool.idle_bytes <= 2000
    pool.give(big)
    assert pool.idle_bytes <= 10_000


def test_a_result_sharing_its_input_buffer_is_written_before_the_buffer_is_reused(
    llama_fp32, tmp_path, write_recipe, monkeypatch
):
    """passthrough returns the input tensor itself: its buffer may only be reused once the (slow) writer
    has written it, or later reads would overwrite a tensor still waiting in the writer's queue."""
    original = ShardedWriter.write

    def slow_write(self, name, tensor):
        time.sleep(0.02)
        original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", slow_write)
    recipe = write_recipe(
        f"merge_method: passthrough\nmodels:\n  - model: {llama_fp32['base']}\ndtype: float32\n"
    )
    out = load_folder(run_merge(recipe, tmp_path / "out", progress=False, echo=lambda _: None))
    source = load_folder(llama_fp32["base"])
    assert set(out) == set(source)
    for name, tensor in source.items():
        assert torch.equal(out[name], tensor), name
