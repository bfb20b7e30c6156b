"""safetensors dtype codes <-> torch dtypes, and byte sizes (no torch import needed for sizes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusemerge.errors import FusemergeError

if TYPE_CHECKING:
    import torch

ITEM_SIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
# Recipe spellings that mergekit accepts, mapped to the canonical torch name.
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


def code_for_name(name: str, *, key: str = "dtype") -> str:
    """'bfloat16' (or 'bf16', 'torch.bfloat16') -> 'BF16'."""
    canonical = name.removeprefix("torch.")
    canonical = _ALIASES.get(canonical, canonical)
    if canonical not in _NAMES:
        raise FusemergeError(f"unknown dtype '{name}' (choose from {', '.join(sorted(_NAMES))})", key=key)
    return _NAMES[canonical]


def name_for_code(code: str) -> str:
    return {v: k for k, v in _NAMES.items()}[code]


def torch_dtype(code: str) -> torch.dtype:
    import torch

    return getattr(torch, name_for_code(code))


def code_for_torch(dtype: torch.dtype) -> str:
    return code_for_name(str(dtype))
