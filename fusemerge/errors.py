"""One exception type for user mistakes.

The CLI prints a `FusemergeError` as one line and exits with code 2; any other exception is a bug and
keeps its traceback. Naming the file, key or tensor at fault is what makes the line actionable.
"""

from __future__ import annotations

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


def exit_2_on_user_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """CLI decorator: a FusemergeError becomes one line on stderr and exit code 2; Ctrl-C says how to resume."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FusemergeError as exc:
            print(f"fusemerge: error: {exc.one_line()}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("fusemerge: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper
