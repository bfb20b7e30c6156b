"""`torch` for the merge methods and kernels, imported on first use rather than at start-up.

Importing torch costs ~1.4 CPU-seconds (more than the whole I/O floor of merging three 337M-parameter
models on our 2-core machines), yet the elementwise merges streamed by `fusemerge.merge.elementwise`
never touch a tensor: their arithmetic is numba over numpy views. Every method module registers itself
at import (the plan needs the registry), so each imports `torch` from here instead: the name is a proxy
whose first attribute access imports the real module; later accesses are one dictionary lookup more.
"""

from __future__ import annotations

import importlib
from typing import Any


class _LazyModule:
    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)


torch: Any = _LazyModule("torch")
F: Any = _LazyModule("torch.nn.functional")
