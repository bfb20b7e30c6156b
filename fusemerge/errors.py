"""One exception type for user mistakes.

The CLI prints a `FusemergeError` as one line and exits with code 2; any other exception is a bug and
keeps its traceback. Naming the file, key or tensor at fault is what makes the line actionable.
"""

from __future__ import annotations

from os import PathLike


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
