"""One exception type for user mistakes.

The CLI prints a `FusemergeError` as one line and exits with code 2; any other exception is a bug and
keeps its traceback. Naming the file, key or tensor at fault is what makes the line actionable.

The machine's own refusals are the user's to fix too, wherever they happen: a full disk (ENOSPC, EDQUOT),
a read-only or forbidden folder (EROFS, EACCES, EPERM), raised by Python as OSError or by safetensors as a
SafetensorError that carries the OS error number. Every writer already writes under a temporary name and
publishes by rename, so nothing half-written looks complete; the CLI boundary turns these into one line.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from functools import wraps
from os import PathLike
from typing import Any


class FusemergeError(Exception):
    """A problem with the user's input (recipe, model folder, data), not with fusemerge itself."""

    def __init__(
        self,
        message: str,
        *,
        file: str | PathLike[str] | None = None,
        line: int | None = None,
        key: str | None = None,
        tensor: str | None = None,
    ) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.key = key
        self.tensor = tensor
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file if self.line is None else f"{self.file}:{self.line}")
        if self.key is not None:
            where.append(f"key '{self.key}'")
        if self.tensor is not None:
            where.append(f"tensor '{self.tensor}'")
        text = " ".join(self.message.split())  # one line, whatever the message held
        return f"{', '.join(where)}: {text}" if where else text


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer (a Trainer checkpoint's optimizer state) reports a failed write without an errno:
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" raised from
# "basic_ios::clear: iostream error" when the disk fills up (measured on a 64 kB tmpfs)
_TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter failed writing", "iostream error")


def environment_error(exc: BaseException) -> FusemergeError | None:
    """A full disk or an unwritable folder as a FusemergeError (None for anything else, a bug).

    The exception itself or any exception it was raised from: a library may wrap the OSError.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code, filename = None, None
        if isinstance(current, OSError):
            code, filename = current.errno, current.filename
        elif type(current).__name__ == "SafetensorError":
            found = _OS_ERROR_IN_TEXT.search(str(current))
            code = int(found.group(1)) if found else None
        if code in FULL_DISK:
            return FusemergeError(
                f"{os.strerror(code)} (while writing {'a safetensors file' if filename is None else 'it'}): "
                "free some space, then rerun the same command (finished steps and shards are kept)",
                file=filename,
            )
        if code in NOT_WRITABLE:
            return FusemergeError(
                f"{os.strerror(code)}: make the folder writable or choose another output / work_dir",
                file=filename,
            )
        if isinstance(current, RuntimeError) and any(mark in str(current) for mark in _TORCH_WRITE_FAILED):
            return FusemergeError(
                f"writing a torch file (a training checkpoint) failed ({_first_line(str(current))}): most "
                "often a full disk; free some space, then rerun the same command (the last complete "
                "checkpoint is resumed from, a half-written one skipped)"
            )
        current = current.__cause__ or current.__context__
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def exit_2_on_user_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """CLI decorator: a FusemergeError becomes one line on stderr and exit code 2; Ctrl-C says how to resume.

    So do a full disk and an unwritable folder (`environment_error`); other exceptions keep their traceback.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FusemergeError as exc:
            print(f"fusemerge: error: {exc.one_line()}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:
            found = environment_error(exc)
            if found is None:
                raise
            print(f"fusemerge: error: {found.one_line()}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("fusemerge: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper
