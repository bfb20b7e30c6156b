"""A full disk or an unwritable folder on the fuse and eval side: one line, exit 2, nothing that looks
complete, and the rerun (once there is room) finishes the run.

A real full disk is a small tmpfs where this machine lets us mount one (root in a container); the same
paths are also driven by a patched writer that raises what a full disk raises, so they run everywhere.
"""

from __future__ import annotations

import errno
import os

import pytest
import safetensors.numpy
from safetensors import SafetensorError
from transformers import PreTrainedModel

from fusemerge.fuse.store import MANIFEST
from tests.faults.conftest import assert_one_line_exit_2
from tests.faults.fuse_fixtures import (
    build_fuse_models,
    fuse_recipe,
    run_fuse_cli,
    try_mount_tmpfs,
    unmount,
)

# What safetensors raises when the disk fills up under it (its Rust writer's io::Error, as text).
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def fuse_models(tmp_path_factory):
    return build_fuse_models(tmp_path_factory.mktemp("fuse-models"))


def _complete_stores(work):
    return [m.parent.name for m in work.glob(f"teacher/*/{MANIFEST}") if '"complete": true' in m.read_text()]


def test_disk_full_while_writing_a_store_then_rerun(tmp_path, fuse_models, monkeypatch):
    real = safetensors.numpy.save_file
    calls = {"n": 0}

    def filling_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the first shard fits, then the disk is full
            raise SafetensorError(FULL)
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", filling_up)
    recipe = fuse_recipe(tmp_path, fuse_models)
    line = assert_one_line_exit_2(run_fuse_cli(recipe))
    assert "No space left on device" in line and "rerun the same command" in line, line
    work = tmp_path / "out" / "work"
    assert not _complete_stores(work), "a store was marked complete"
    assert list(work.glob("teacher/*/shard-*.safetensors")), "the shard written before is kept for the rerun"

    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    result = run_fuse_cli(recipe)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "pivot-source" / "model.safetensors").is_file()


def test_disk_full_while_saving_the_target(tmp_path, fuse_models, monkeypatch):
    real = PreTrainedModel.save_pretrained

    def full(self, folder, *args, **kwargs):
        if "out" in os.fspath(folder) and "work" not in os.fspath(folder):  # the target, not a checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(folder, "model.safetensors"))
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    recipe = fuse_recipe(tmp_path, fuse_models)
    line = assert_one_line_exit_2(run_fuse_cli(recipe))
    assert "model.safetensors: No space left on device" in line, line
    out = tmp_path / "out"
    assert not (out / "pivot-source").exists(), "a target folder under its final name"
    assert not [p for p in out.iterdir() if p.name != "work"], sorted(out.iterdir())


def test_a_real_full_disk_under_the_output(tmp_path, fuse_models):
    small = tmp_path / "small"
    if not try_mount_tmpfs(small, "size=100k"):  # the stores fit elsewhere; the 240 kB target does not
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        recipe = fuse_recipe(
            tmp_path, fuse_models, output=str(small / "out"), work_dir=str(tmp_path / "work")
        )
        line = assert_one_line_exit_2(run_fuse_cli(recipe))
        assert "No space left on device" in line, line
        assert not (small / "out" / "pivot-source").exists()
        assert sorted(p.name for p in (small / "out").iterdir()) == [], "a half-written target is left"
    finally:
        unmount(small)


def test_eval_refuses_a_non_utf8_data_file_naming_file_line_and_byte(tmp_path, fuse_models):
    from click.testing import CliRunner

    from fusemerge.cli import main

    data = tmp_path / "heldout.jsonl"
    lines = fuse_models["data"].read_bytes().splitlines(keepends=True)[:2]
    data.write_bytes(b"".join(lines) + b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    result = CliRunner().invoke(main, ["eval", str(fuse_models["pivot"]), "--data", str(data), "-q"])
    line = assert_one_line_exit_2(result)
    assert f"{data}:3" in line and "not UTF-8" in line and "byte 0xff" in line, line


def test_eval_save_to_is_checked_before_the_evaluation(tmp_path, fuse_models, monkeypatch):
    from click.testing import CliRunner

    import fusemerge.evaluate
    from fusemerge.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran before --save-to was checked")

    monkeypatch.setattr(fusemerge.evaluate, "evaluate_models", never)
    args = ["eval", str(fuse_models["pivot"]), "--data", str(fuse_models["data"]), "-q"]
    result = CliRunner().invoke(main, [*args, "--save-to", str(tmp_path / "missing")])
    line = assert_one_line_exit_2(result)
    assert "--save-to must be an existing folder" in line, line
