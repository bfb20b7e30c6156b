"""Resolving a recipe's model references to local folders, checked before any work starts."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.reader import ModelFolder
from fusemerge.errors import FusemergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/"))


def resolve_model_path(ref: str, *, recipe_dir: Path | None = None) -> Path:
    """A local folder (as given, then relative to the recipe's folder), else the local Hub cache.

    One reference; `model+lora` pairs are split by `open_models`.
    """
    candidates = [Path(os.path.expanduser(ref))]
    if recipe_dir is not None and not Path(ref).is_absolute():
        candidates.append(recipe_dir / ref)
    for path in candidates:
        if path.is_dir():
            return path
    if is_hub_id(ref):
        cached = _from_hub_cache(ref)
        if cached is not None:
            return cached
        offline = " (HF_HUB_OFFLINE is set: nothing is downloaded)" if _offline() else ""
        raise FusemergeError(
            f"model '{ref}' is neither a local folder nor in the Hugging Face cache{offline}; download it "
            f"first (hf download {ref}) or give a local path",
            key="models",
        )
    raise FusemergeError("model folder not found", file=ref, key="models")


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _from_hub_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or no usable cache: the caller explains what to do
        return None


def open_models(refs: list[str], *, recipe_dir: Path | None, allow_pickle: bool) -> dict[str, ModelFolder]:
    """Open every reference (`model+lora` folds the adapter in on read); headers only, no tensor data."""
    from fusemerge.merge.lora import LoraModel

    folders: dict[str, ModelFolder] = {}
    for ref in refs:
        parts = ref.split("+")
        if len(parts) > 2 or not all(p.strip() for p in parts):
            raise FusemergeError(f"cannot parse model reference '{ref}' (MODEL or MODEL+LORA)", key="models")
        path = resolve_model_path(parts[0], recipe_dir=recipe_dir)
        try:
            if len(parts) == 2:
                adapter = resolve_model_path(parts[1], recipe_dir=recipe_dir)
                folders[ref] = LoraModel(path, adapter, allow_pickle=allow_pickle)
                continue
            folders[ref] = ModelFolder(path, allow_pickle=allow_pickle)
        except FusemergeError as exc:
            if exc.file is None:
                exc = FusemergeError(exc.message, file=path, key=exc.key, tensor=exc.tensor)
            raise exc from None
    return folders


def num_layers(folder: ModelFolder) -> int:
    """The layer count used for gradients: from config.json, else from the tensor names."""
    from fusemerge.merge.parameters import layer_index

    config = folder.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    indices = [i for name in folder.tensors if (i := layer_index(name)) is not None]
    return max(indices) + 1 if indices else 1


def architecture_of(config: Mapping[str, Any] | None) -> str | None:
    """What a config.json says the model is: its `architectures`, else its `model_type`."""
    config = config or {}
    names = config.get("architectures")
    return ",".join(names) if names else config.get("model_type")


def check_same_architecture(
    configs: Mapping[str, Mapping[str, Any] | None], reference: str, *, label: str, file: Any
) -> None:
    """Models whose config.json names another architecture than the reference's are refused before any
    tensor is read (both engines); a model whose config names none is not compared.

    Args:
        configs: each model's config.json by its reference.
        reference: the key of the model the others are compared with.
        label: how the message names the reference model.
        file: the recipe, for the message.
    """
    expected = architecture_of(configs[reference])
    for ref, config in configs.items():
        found = architecture_of(config)
        if expected and found and found != expected:
            raise FusemergeError(
                f"model '{ref}' is a {found} but {label} is a {expected}; they cannot be merged",
                file=file,
                key="models",
            )
