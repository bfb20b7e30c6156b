"""mergekit as the fallback engine, for recipes that use what the streaming engine does not do.

Frankenmerges (`slices`), `modules`, vocabulary surgery (`tokenizer`, `tokenizer_source: union`) and
mixture-of-experts recipes (`experts`, mergekit-moe's format) run through mergekit's own `run_merge` (or
its MoE builder), with fusemerge's methods registered in mergekit's registry first, so `variation_ratio`
works inside slices too. The recipe is still checked whole before mergekit starts: mergekit's own schema,
the method and its parameter names, and every model reference resolved to a local folder (the Hub only
through the local cache), each with a config.json of the same architecture. mergekit then gets the
resolved local paths, so it never downloads anything.

The output folder is handled as the streaming engine handles it (`fusemerge.merge.output`): one lock,
a state manifest ("running", then "complete"), a foreign folder refused unless `--overwrite`, and the
recipe and a fusemerge model card written beside mergekit's weights. mergekit cannot resume, so an
interrupted run is redone whole.

mergekit is optional (`pip install 'fusemerge[mergekit]'`); without it these recipes get a clear error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusemerge.card import merge_card
from fusemerge.errors import FusemergeError
from fusemerge.merge.models import check_same_architecture, resolve_model_path
from fusemerge.merge.options import MergeOptions
from fusemerge.merge.output import claimed_output, mark_complete, write_record
from fusemerge.merge.parameters import check_parameter_names
from fusemerge.merge.recipe import RecipeFile

LOG = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'fusemerge[mergekit]'"
_MODEL_KEYS = ("model", "base_model", "source_model", "tokenizer_source", "source")
MERGEKIT_URL = "https://github.com/arcee-ai/mergekit"
MOE_URL = "https://github.com/arcee-ai/mergekit/blob/main/docs/moe.md"


def require_mergekit() -> None:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        raise FusemergeError(
            f"this recipe needs mergekit as the fallback engine, and it is not installed: {INSTALL_HINT}"
        ) from None
    import fusemerge.merge.mergekit_plugin  # noqa: F401  (registers variation_ratio in mergekit)


def run_with_mergekit(
    source: RecipeFile,
    out: Path,
    options: MergeOptions,
    *,
    echo: Callable[[str], Any],
    echo_warning: Callable[[FusemergeError], None] | None = None,
) -> Path:
    """Validate the recipe whole, then run it through mergekit; returns `out`."""
    require_mergekit()
    path, text, moe = source.path, source.text, source.moe
    resolved = _resolve_references(source.data, path)
    warn = None if options.strict else echo_warning
    config, method = _validate(resolved, path, moe=moe, strict=options.strict, warn=warn)
    _check_models(resolved, path)
    if options.dry_run:
        echo(_describe(path, resolved, out, moe=moe))
        return out

    from mergekit.options import MergeOptions as MergekitOptions

    fingerprint = _fingerprint(text, resolved, options)
    with claimed_output(out, fingerprint, overwrite=options.overwrite, resumable=False) as fresh:
        if not fresh:
            echo(f"{out}: this merge is already complete; nothing to do")
            return out
        with tempfile.TemporaryDirectory(prefix="fusemerge-lora-") as lora_cache:
            mergekit_options = MergekitOptions(
                random_seed=options.random_seed,
                out_shard_size=options.out_shard_size,
                device=options.device,
                cuda=options.device.startswith("cuda"),
                quiet=not options.progress,
                lora_merge_cache=lora_cache,
            )
            _seed_like_mergekit(options.random_seed)
            if moe:
                from mergekit.scripts.moe import build

                build(config, str(out), mergekit_options, device=options.device)
            else:
                from mergekit.merge import run_merge

                run_merge(config, str(out), options=mergekit_options, config_source=text)
        write_record(out, text, _card(source, method))
        mark_complete(out, fingerprint)
    echo(f"merged with mergekit into {out}")
    return out


def _seed_like_mergekit(seed: int | None) -> None:
    """Seed every generator as `mergekit-yaml/-moe --random-seed N` do (their `apply_global_options`):
    mergekit's own `run_merge` and MoE `build` never read `MergeOptions.random_seed`, so without this
    `gate_mode: random` gates (and DARE draws in slices) changed from run to run whatever the seed."""
    if seed is None:
        return
    from transformers.trainer_utils import set_seed

    set_seed(seed)


def _card(source: RecipeFile, method: Any) -> str:
    """fusemerge's model card for a mergekit run (it replaces the card mergekit writes itself)."""
    data = source.data
    if source.moe:
        name, pretty, url = "moe", "mergekit-moe (mixture of experts)", MOE_URL
    else:  # mergekit's method, or fusemerge's VaRM as the plugin registered it
        name = str(data["merge_method"])
        pretty, url = method.spec.pretty_name or name, method.spec.reference_url or MERGEKIT_URL
    base = data.get("base_model")
    models = [r for r in _recipe_refs(data) if r != base]
    return merge_card(
        method_name=name,
        method_pretty=pretty,
        method_url=url,
        base_model=base if isinstance(base, str) else None,
        models=models,
        recipe_text=source.text,
        extra_tags=["mergekit"],
    )


def _recipe_refs(data: Any) -> list[str]:
    """The model references as the recipe spells them, in recipe order, without duplicates."""
    refs: list[str] = []
    _walk_refs(data, lambda r: refs.append(r) or r)
    return list(dict.fromkeys(r for r in refs if r not in ("base", "union")))


def _fingerprint(text: str, resolved: Any, options: MergeOptions) -> str:
    """Recipe + resolved inputs (each folder's files, by size and time) + the options that shape the output."""
    inputs = []
    for folder in map(Path, _model_paths(resolved)):
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        inputs.append([str(folder), [[f.name, (s := f.stat()).st_size, s.st_mtime_ns] for f in files]])
    blob = json.dumps(
        {
            "engine": "mergekit",
            "recipe": text,
            "inputs": inputs,
            "out_shard_size": options.out_shard_size,
            "seed": options.random_seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


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


def _validate(
    data: Any,
    path: Path,
    *,
    moe: bool,
    strict: bool = False,
    warn: Callable[[FusemergeError], None] | None = None,
) -> tuple[Any, Any]:
    """(mergekit's validated config, its merge method or None for MoE), or a one-line error."""
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
        key = _error_key(exc) if isinstance(exc, ValidationError) else None
        raise FusemergeError(f"mergekit refuses the recipe: {_first_line(exc)}", file=path, key=key) from None
    _check_unknown_keys(data, path, moe=moe)
    return config, None if moe else _check_method(config, data, path, strict=strict, warn=warn)


def _error_key(exc: Any) -> str | None:
    """The recipe key of a pydantic error (`slices[0].sources`), for its line."""
    errors = exc.errors()
    if not errors:
        return None
    key = ""
    for part in errors[0]["loc"]:
        if isinstance(part, int):
            key += f"[{part}]"
        elif "[" not in str(part) and not str(part).startswith("function"):
            key += f".{part}" if key else str(part)
    return key or None


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


def _check_method(
    config: Any,
    data: dict[str, Any],
    path: Path,
    *,
    strict: bool = False,
    warn: Callable[[FusemergeError], None] | None = None,
) -> Any:
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
        check_parameter_names(config.merge_method, known, where, scope, file=path, strict=strict, warn=warn)
    return method


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
    configs: dict[str, dict[str, Any]] = {}
    for folder in map(Path, _model_paths(data)):
        if (folder / "adapter_config.json").is_file():
            continue
        config_path = folder / "config.json"
        try:
            configs[str(folder)] = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise FusemergeError("model folder has no config.json", file=folder) from None
        except (OSError, ValueError) as exc:
            raise FusemergeError(f"unreadable config.json ({exc})", file=config_path) from None
    if configs:
        reference = next(iter(configs))
        check_same_architecture(configs, reference, label=reference, file=path)


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
