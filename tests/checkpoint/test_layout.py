"""The output-folder protocol: a folder under its final name is complete, one writer per folder."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from fusemerge.checkpoint.layout import (
    atomic_write_text,
    done_path,
    exclusive_lock,
    partial_path,
    read_state,
    staged_folder,
    stale_tmp_siblings,
    tmp_sibling,
    write_state,
)
from fusemerge.errors import FusemergeError


def test_staged_folder_appears_only_when_complete(tmp_path) -> None:
    final = tmp_path / "target"
    with staged_folder(final) as tmp:
        (tmp / "weights").write_text("w")
        assert not final.exists() and tmp.parent == tmp_path and tmp.name.startswith("target.tmp-")
    assert (final / "weights").read_text() == "w"
    assert stale_tmp_siblings(tmp_path) == []


def test_staged_folder_leaves_nothing_on_failure(tmp_path) -> None:
    final = tmp_path / "target"
    with pytest.raises(RuntimeError), staged_folder(final) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-save")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_tmp_siblings_are_per_process_and_found_as_stale(tmp_path) -> None:
    path = tmp_path / "shard-00000.safetensors"
    tmp = tmp_sibling(path)
    assert tmp.name == f"shard-00000.safetensors.tmp-{os.getpid()}"
    tmp.write_text("x")
    assert stale_tmp_siblings(tmp_path) == [tmp]


def test_shard_names_are_hidden_until_published(tmp_path) -> None:
    assert partial_path(tmp_path, "model.safetensors").name == ".model.safetensors.partial"
    assert done_path(tmp_path, "model.safetensors").name == ".model.safetensors.done"


def test_state_round_trip_and_unreadable_state_is_empty(tmp_path) -> None:
    assert read_state(tmp_path) == {}
    write_state(tmp_path, {"status": "running"})
    assert read_state(tmp_path) == {"status": "running"}
    atomic_write_text(tmp_path / ".fusemerge" / "manifest.json", "{not json")
    assert read_state(tmp_path) == {}


def _hold_lock(folder, ready, release) -> None:
    with exclusive_lock(folder):
        ready.set()
        release.wait(10)


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with (
            pytest.raises(
                FusemergeError, match=f"another fuse run is writing this folder \\(pid {holder.pid}\\)"
            ),
            exclusive_lock(tmp_path, what="fuse run"),
        ):
            pass
    finally:
        release.set()
        holder.join(10)
    with exclusive_lock(tmp_path):  # released when its holder exits
        pass
