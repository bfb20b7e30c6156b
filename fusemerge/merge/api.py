"""`fusemerge merge` as a Python function: recipe -> plan -> streamed shards -> complete model folder.

    from fusemerge.merge.api import run_merge
    run_merge("recipe.yml", "merged/", device="cpu")

The output folder is only ever in one of three states: being written (a lock is held, shards appear under
final names only when complete), complete (the index exists, written last), or interrupted (rerun the
same command: finished shards are kept, the rest is redone). A folder holding anything else is refused
unless `overwrite=True`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusemerge import __version__
from fusemerge.card import merge_card
from fusemerge.checkpoint.dtypes import name_for_code
from fusemerge.checkpoint.layout import (
    DONE_SUFFIX,
    INDEX_NAME,
    PARTIAL_SUFFIX,
    RECIPE_NAME,
    STATE_DIR,
    TOKENIZER_FILES,
    atomic_write_text,
    exclusive_lock,
    read_state,
    write_state,
)
from fusemerge.checkpoint.writer import ShardedWriter
from fusemerge.errors import FusemergeError
from fusemerge.lm.templates import resolve_output_template
from fusemerge.merge.fallback import choose_engine, is_moe_recipe, mergekit_reason, run_with_mergekit
from fusemerge.merge.plan import MergePlan, build_plan, describe
from fusemerge.merge.recipe import load_recipe

LOG = logging.getLogger(__name__)
# Everything a merge writes into its output folder (cleared before a merge of another recipe).
OUTPUT_PATTERNS = (
    "*.safetensors",
    INDEX_NAME,
    f".*{PARTIAL_SUFFIX}",
    f".*{DONE_SUFFIX}",
    "config.json",
    "generation_config.json",
    RECIPE_NAME,
    "README.md",
    *TOKENIZER_FILES,
)


def run_merge(
    recipe: str | Path,
    out: str | Path,
    *,
    dry_run: bool = False,
    device: str = "cpu",
    out_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
    engine: str = "auto",
    random_seed: int | None = None,
) -> Path:
    """Merge the models of `recipe` into the folder `out`; returns `out`.

    Args:
        recipe: a mergekit-style YAML recipe.
        out: the output folder; created if missing.
        dry_run: print the plan (tensors, bytes, estimated peak memory) and write nothing.
        device: where the arithmetic runs ("cpu", "cuda", "cuda:1"); reading and writing stay streaming.
        out_shard_size: largest output shard, in bytes of tensor data.
        overwrite: replace an output folder that holds something else.
        allow_pickle: accept pickle checkpoints (they can run code when loaded).
        allow_nonfinite: merge inputs that hold NaN or Inf instead of stopping at the first one.
        progress: show progress bars.
        echo: where one-line status messages go.
        engine: "streaming", "mergekit" (the fallback engine) or "auto": streaming unless the recipe
            uses what only mergekit does (slices, modules, tokenizer surgery, MoE).
        random_seed: seed of the random methods (DARE, DELLA); the same seed gives the same model.
    """
    out = Path(out)
    moe = is_moe_recipe(_peek_yaml(Path(recipe)))
    loaded = None if moe else load_recipe(recipe)
    reason = ("experts", "mergekit-moe's experts format") if moe else mergekit_reason(loaded.recipe)
    chosen, why = choose_engine(engine, reason)
    if chosen == "mergekit":
        echo(f"engine: mergekit ({why})")
        text = loaded.text if loaded is not None else Path(recipe).read_text(encoding="utf-8")
        return run_with_mergekit(
            Path(recipe),
            text,
            out,
            dry_run=dry_run,
            device=device,
            out_shard_size=out_shard_size,
            overwrite=overwrite,
            random_seed=random_seed,
            progress=progress,
            echo=echo,
        )
    if loaded is None:
        raise FusemergeError(
            "a MoE recipe (experts) needs --engine mergekit or auto", file=recipe, key="experts"
        )
    plan = build_plan(
        loaded, out_shard_size=out_shard_size, allow_pickle=allow_pickle, random_seed=random_seed
    )
    echo(f"engine: streaming ({why})")
    device = _check_device(device)
    _tokenizer_folder(plan)  # validate tokenizer_source and chat_template before any work
    if plan.loaded.recipe.chat_template:
        resolve_output_template(plan.loaded.recipe.chat_template, [f.path for f in plan.folders.values()])
    if dry_run:
        echo(describe(plan, out))
        return out

    fingerprint = plan.fingerprint()
    _refuse_foreign_folder(out, fingerprint, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, what="merge"):
        state = read_state(out)
        complete = state.get("fingerprint") == fingerprint and state.get("status") == "complete"
        if complete and not overwrite and (out / INDEX_NAME).is_file():
            echo(f"{out}: this merge is already complete; nothing to do")
            return out
        if state.get("fingerprint") != fingerprint or overwrite:
            _clear_outputs(out)
        _write_manifest(out, fingerprint, "running")

        writer = ShardedWriter(out, plan.shards)
        finished = writer.finished_shards()
        if finished:
            echo(f"resuming: {len(finished)} of {len(plan.shards)} shard(s) already complete")
        execute_fn = _engine()
        execute_fn(
            plan,
            writer,
            skip_shards=finished,
            device=device,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
        )
        writer.publish()
        _write_side_files(plan, out)
        writer.write_index()
        _write_manifest(out, fingerprint, "complete")
    echo(f"merged {len(plan.tasks)} tensors into {out} ({len(plan.shards)} shard(s))")
    return out


def _peek_yaml(path: Path) -> Any:
    """The recipe's YAML data, or None when unreadable (load_recipe then reports the problem)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _engine():
    from fusemerge.merge.engine import execute

    return execute


def _check_device(device: str) -> str:
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise FusemergeError(
                "--device cuda was asked for, but no CUDA device is available", key="--device"
            )
        return device
    raise FusemergeError(f"unknown device '{device}' (cpu, cuda or cuda:N)", key="--device")


# -- output folder state ------------------------------------------------------------------------------
def _write_manifest(out: Path, fingerprint: str, status: str) -> None:
    write_state(out, {"fingerprint": fingerprint, "status": status, "fusemerge_version": __version__})


def _refuse_foreign_folder(out: Path, fingerprint: str, overwrite: bool) -> None:
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise FusemergeError("the output path exists and is not a folder", file=out)
    entries = [p for p in out.iterdir() if p.name != STATE_DIR]
    state = read_state(out)
    if state.get("fingerprint") == fingerprint:
        return
    if state:
        raise FusemergeError(
            "the output folder holds a merge of a different recipe, inputs or --out-shard-size; pass --overwrite to replace it",
            file=out,
        )
    if entries:
        raise FusemergeError(
            "the output folder exists and is not empty; pass --overwrite to replace it", file=out
        )


def _clear_outputs(out: Path) -> None:
    for pattern in OUTPUT_PATTERNS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


# -- side files ---------------------------------------------------------------------------------------
def _write_side_files(plan: MergePlan, out: Path) -> None:
    recipe = plan.loaded.recipe
    reference = plan.folders[plan.base_ref] if plan.base_ref else plan.folders[plan.input_refs[0]]
    if reference.config is not None:
        config = dict(reference.config)
        out_dtypes = {t.out_dtype for t in plan.tasks if t.copy_from is None}
        if len(out_dtypes) == 1:
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = name_for_code(out_dtypes.pop())
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    generation = reference.path / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, out / "generation_config.json")

    tokenizer_folder = _tokenizer_folder(plan)
    for name in TOKENIZER_FILES:
        src = tokenizer_folder.path / name
        if src.is_file():
            shutil.copy(src, out / name)
    if recipe.chat_template:
        template = resolve_output_template(recipe.chat_template, [f.path for f in plan.folders.values()])
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        config_path = out / "tokenizer_config.json"
        if config_path.is_file():
            tok_config = json.loads(config_path.read_text())
            tok_config.pop("chat_template", None)
            atomic_write_text(config_path, json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")

    atomic_write_text(out / RECIPE_NAME, plan.loaded.text)
    card = merge_card(
        method_name=plan.method.name,
        method_pretty=plan.method.pretty_name,
        method_url=plan.method.reference_url,
        base_model=plan.base_ref,
        models=plan.input_refs,
        recipe_text=plan.loaded.text,
    )
    atomic_write_text(out / "README.md", card)


def _tokenizer_folder(plan: MergePlan):
    source = plan.loaded.recipe.tokenizer_source
    if source in (None, "base"):
        return plan.folders[plan.base_ref] if plan.base_ref else plan.folders[plan.input_refs[0]]
    if source in plan.folders:
        return plan.folders[source]
    raise FusemergeError(
        f"tokenizer_source '{source}' is not one of the recipe's models (or 'base')", key="tokenizer_source"
    )
