"""The CLI boundary: a user mistake, a full disk or an unwritable folder is one line and exit 2; a bug is not."""

from __future__ import annotations

import errno
import os

import pytest
from safetensors import SafetensorError

from fusemerge.errors import FusemergeError, environment_error, exit_2_on_user_error


def _raising(exc: BaseException):
    @exit_2_on_user_error
    def command() -> None:
        raise exc

    return command


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/model.safetensors"),
            "/out/model.safetensors: No space",
        ),
        (
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
            "No space",
        ),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/x"), "/ro/x: Read-only file system"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/p"), "/p: Permission denied"),
        (FusemergeError("bad key", key="k"), "key 'k': bad key"),
    ],
)
def test_user_side_faults_are_one_line_and_exit_2(capsys, exc, expected):
    with pytest.raises(SystemExit) as info:
        _raising(exc)()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fusemerge: error: ") and expected in err, err


def test_a_wrapped_os_error_is_found_through_the_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as inner:
            raise RuntimeError("file write failed") from inner
    except RuntimeError as outer:
        found = environment_error(outer)
    assert found is not None and "No space left on device" in found.message


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "I/O error"),
        FileNotFoundError(errno.ENOENT, "gone"),
        ValueError("a bug"),
        SafetensorError("header too large"),
    ],  # fmt: skip
)
def test_anything_else_keeps_its_traceback(exc):
    assert environment_error(exc) is None
    with pytest.raises(type(exc)):
        _raising(exc)()


def test_a_torch_save_on_a_full_disk_is_one_line(tmp_path):
    """torch.save's zip writer (a Trainer checkpoint) fails on a full disk with a RuntimeError and no errno;
    before, that was a traceback. Measured on a real tmpfs where the machine allows mounting one."""
    import torch

    from tests.faults.fuse_fixtures import try_mount_tmpfs, unmount

    where = tmp_path / "small"
    if try_mount_tmpfs(where, "size=64k"):
        try:
            with pytest.raises(RuntimeError) as info:
                torch.save({"a": torch.zeros(100_000)}, where / "optimizer.pt")
        finally:
            unmount(where)
        exc = info.value
    else:  # what the tmpfs run raised: the zip writer's complaint, from the stream's failure
        try:
            try:
                raise RuntimeError("basic_ios::clear: iostream error")
            except RuntimeError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # noqa: B904
        except RuntimeError as raised:
            exc = raised
    found = environment_error(exc)
    assert isinstance(found, FusemergeError)
    assert "most often a full disk" in found.one_line() and "\n" not in found.one_line()
    assert environment_error(RuntimeError("shape mismatch in matmul")) is None  # a bug keeps its traceback
