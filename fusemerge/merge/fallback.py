"""mergekit as the fallback engine, for recipes that use what the streaming engine does not do.

Frankenmerges (`slices`), `modules`, vocabulary surgery (`tokenizer`, `tokenizer_source: union`) and
mixture-of-experts recipes (`experts`, mergekit-moe's format) run through mergekit's own `run_merge` (or
its MoE builder), with fusemerge's methods registered in mergekit's registry first, so `variation_ratio`
works inside slices too. The recipe is still checked whole before mergekit starts: mergekit's own schema,
the method and its parameter names, and every model reference resolved to a local folder (the Hub only
through the local cache), each with a config.json of the same architecture. mergekit then gets the
resolved local paths, so it never downloads anything.

mergekit is optional (`pip install 'fusemerge[mergekit]'`); without it these recipes get a clear error.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fusemerge.checkpoint.layout import RECIPE_NAME
from fusemerge.errors import FusemergeError
from fusemerge.merge.models import resolve_model_path
from fusemerge.merge.recipe import MergeRecipe

LOG = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'fusemerge[mergekit]'"
ENGINES = ("auto", "streaming", "mergekit")
_MODEL_KEYS = ("model", "base_model", "source_model", "tokenizer_source", "source")


def mergekit_reason(recipe: MergeRecipe) -> tuple[str, str] | None:
    """(recipe key, what) for the first feature only mergekit does, or None if streaming can run it."""
    if recipe.slices is not None:
        return "slices", "slices (a frankenmerge)"
    if recipe.modules is not None:
        return "modules", "modules"
    if recipe.tokenizer is not None:
        return "tokenizer", "the 'tokenizer' section (vocabulary union/permutation)"
    if recipe.tokenizer_source == "union":
        return "tokenizer_source", "tokenizer_source: union"
    return None


def is_moe_recipe(data: Any) -> bool:
    """mergekit-moe's format: a base model and a list of `experts`, no merge_method."""
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def choose_engine(engine: str, reason: tuple[str, str] | None) -> tuple[str, str]:
    """(engine that runs, why), for the CLI to say."""
    if engine not in ENGINES:
        raise FusemergeError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})", key="--engine")
    if engine == "mergekit":
        return "mergekit", "asked for with --engine mergekit"
    if reason is None:
        return "streaming", "the recipe uses only what the streaming engine does"
    if engine == "streaming":
        return "streaming", ""  # build_plan refuses the feature by name
    return "mergekit", f"the recipe uses {reason[1]}"


def require_mergekit() -> None:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        raise FusemergeError(
            f"this recipe needs mergekit as the fallback engine, and it is not installed: {INSTALL_HINT}"
        ) from None
    import fusemerge.merge.mergekit_plugin  # noqa: F401  (registers variation_ratio in mergekit)


def run_with_mergekit(
    path: Path,
    text: str,
    out: Path,
    *,
    dry_run: bool,
    device: str,
    out_shard_size: int,
    overwrite: bool,
    random_seed: int | None,
    progress: bool,
    echo: Callable[[str], Any],
) -> Path:
    """Validate the recipe whole, then run it through mergekit; returns `out`."""
    require_mergekit()
    data = yaml.safe_load(text)
    resolved = _resolve_references(data, path)
    moe = is_moe_recipe(data)
    config = _validate(resolved, path, moe=moe)
    _check_models(resolved, path)
    if dry_run:
        echo(_describe(path, resolved, out, moe=moe))
        return out
    _prepare_out(out, overwrite)

    from mergekit.options import MergeOptions

    with tempfile.TemporaryDirectory(prefix="fusemerge-lora-") as lora_cache:
        options = MergeOptions(
            random_seed=random_seed,
            out_shard_size=out_shard_size,
            device=device,
            cuda=device.startswith("cuda"),
            quiet=not progress,
            lora_merge_cache=lora_cache,
        )
        if moe:
            from mergekit.scripts.moe import build

            build(config, str(out), options, device=device)
        else:
            from mergekit.merge import run_merge

            run_merge(config, str(out), options=options, config_source=text)
    (out / RECIPE_NAME).write_text(text, encoding="utf-8")
    echo(f"merged with mergekit into {out}")
    return out


def _walk_refs(node: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (fn(v) if k in _MODEL_KEYS and isinstance(v, str) else _walk_refs(v, fn))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_walk_refs(v, fn) for v in node]
    return node


def _resolve_references(data: Any, path: Path) -> Any:
    """Every model reference (including `model+lora`) replaced by its local folder."""
    cache: dict[str, str] = {}

    def resolve(ref: str) -> str:
        if ref in ("base", "union"):
            return ref
        if ref not in cache:
            parts = ref.split("+")
            if len(parts) > 2:
                raise FusemergeError(f"cannot parse model reference '{ref}' (MODEL or MODEL+LORA)", file=path)
            cache[ref] = "+".join(str(resolve_model_path(p, recipe_dir=path.parent).resolve()) for p in parts)
        return cache[ref]

    return _walk_refs(data, resolve)


def _validate(data: Any, path: Path, *, moe: bool) -> Any:
    from pydantic import ValidationError

    if moe:
        from mergekit.moe.config import MoEMergeConfig

        schema = MoEMergeConfig
    else:
        from mergekit.config import MergeConfiguration

        schema = MergeConfiguration
    try:
        config = schema.model_validate(data)
    except (ValidationError, RuntimeError) as exc:
        raise FusemergeError(f"mergekit refuses the recipe: {_first_line(exc)}", file=path) from None
    _check_unknown_keys(data, path, moe=moe)
    if not moe:
        _check_method(config, data, path)
    return config


def _check_unknown_keys(data: dict[str, Any], path: Path, *, moe: bool) -> None:
    """mergekit's schema ignores unknown keys; a typo there must be an error that names it."""
    if moe:
        from mergekit.moe.config import Expert, MoEMergeConfig

        nested = {"experts": Expert, "shared_experts": Expert}
        _known(data, MoEMergeConfig, "", path)
        for key, cls in nested.items():
            for i, item in enumerate(data.get(key) or []):
                _known(item, cls, f"{key}[{i}]", path)
        return
    from mergekit.config import (
        InputModelDefinition,
        InputSliceDefinition,
        MergeConfiguration,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )

    def check_slices_and_models(node: dict[str, Any], where: str) -> None:
        for i, sl in enumerate(node.get("slices") or []):
            _known(sl, OutputSliceDefinition, f"{where}slices[{i}]", path)
            for j, src in enumerate(sl.get("sources") or [] if isinstance(sl, dict) else []):
                _known(src, InputSliceDefinition, f"{where}slices[{i}].sources[{j}]", path)
        for i, m in enumerate(node.get("models") or []):
            _known(m, InputModelDefinition, f"{where}models[{i}]", path)

    _known(data, MergeConfiguration, "", path)
    check_slices_and_models(data, "")
    for name, module in (data.get("modules") or {}).items():
        _known(module, OutputModuleDefinition, f"modules.{name}", path)
        if isinstance(module, dict):
            check_slices_and_models(module, f"modules.{name}.")


def _known(node: Any, cls: Any, where: str, path: Path) -> None:
    if not isinstance(node, dict):
        return
    for key in node:
        if key not in cls.model_fields:
            raise FusemergeError(
                "unknown key (not a mergekit recipe key)", file=path, key=f"{where}.{key}" if where else key
            )


def _check_method(config: Any, data: dict[str, Any], path: Path) -> None:
    from mergekit import merge_methods

    try:
        method = merge_methods.get(config.merge_method)
    except RuntimeError:
        names = sorted(m.spec.name for m in merge_methods.registered_methods())
        raise FusemergeError(
            f"unknown merge method '{config.merge_method}' (mergekit has: {', '.join(names)})",
            file=path,
            key="merge_method",
        ) from None
    known = {p.name for p in method.spec.parameters}
    for where, scope in _parameter_scopes(data):
        for name in scope:
            if name not in known:
                raise FusemergeError(
                    f"unknown parameter for '{config.merge_method}' (it takes: {', '.join(sorted(known)) or 'none'})",
                    file=path,
                    key=f"{where}.{name}",
                )


def _parameter_scopes(node: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "parameters" and isinstance(value, dict):
                found.append((here, value))
            else:
                found.extend(_parameter_scopes(value, here))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_parameter_scopes(value, f"{where}[{i}]"))
    return found


def _model_paths(data: Any) -> list[str]:
    refs: list[str] = []
    _walk_refs(data, lambda r: refs.append(r) or r)
    return sorted({p for r in refs if r not in ("base", "union") for p in r.split("+")})


def _check_models(data: Any, path: Path) -> None:
    """Each model folder has a config.json; all (but LoRA adapters) share one architecture."""
    architectures: dict[str, str] = {}
    for folder in map(Path, _model_paths(data)):
        if (folder / "adapter_config.json").is_file():
            continue
        config_path = folder / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise FusemergeError("model folder has no config.json", file=folder) from None
        except (OSError, ValueError) as exc:
            raise FusemergeError(f"unreadable config.json ({exc})", file=config_path) from None
        arch = ",".join(config.get("architectures") or [config.get("model_type", "?")])
        architectures[str(folder)] = arch
    if len(set(architectures.values())) > 1:
        listing = "; ".join(f"{k}: {v}" for k, v in architectures.items())
        raise FusemergeError(f"models of different architectures cannot be merged ({listing})", file=path)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FusemergeError("the output path exists and is not a folder", file=out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FusemergeError(
                "the output folder exists and is not empty; pass --overwrite to replace it", file=out
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _describe(path: Path, data: Any, out: Path, *, moe: bool) -> str:
    lines = [f"recipe:        {path}", "engine:        mergekit"]
    if moe:
        lines.append(
            f"MoE:           {len(data.get('experts') or [])} expert(s), gate_mode {data.get('gate_mode', 'hidden')}"
        )
    else:
        lines.append(f"method:        {data.get('merge_method')}")
        if data.get("slices"):
            lines.append(f"slices:        {len(data['slices'])}")
    lines.append(f"models:        {', '.join(_model_paths(data))}")
    lines.append(f"output:        {out}")
    return "\n".join(lines)


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
