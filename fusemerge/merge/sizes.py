"""Human byte sizes ('5GB', '500MiB') for options such as --out-shard-size."""

from __future__ import annotations

import re

from fusemerge.errors import FusemergeError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int, *, what: str = "size") -> int:
    """'5GB' -> 5_000_000_000 bytes (decimal units as transformers uses them; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise FusemergeError(f"cannot read '{text}' as a byte size (e.g. 5GB, 500MB, 2GiB)", key=what)
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise FusemergeError(f"'{text}' must be a positive size", key=what)
    return size
