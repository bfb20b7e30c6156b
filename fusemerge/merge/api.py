"""`fusemerge merge` as a Python function: recipe -> plan -> streamed shards -> complete model folder.

    from fusemerge.merge.api import run_merge
    from fusemerge.merge.options import MergeOptions
    run_merge("recipe.yml", "merged/", MergeOptions(device="cpu"))
    run_merge("recipe.yml", "merged/", device="cpu")   # the same, by keyword

The recipe is read and parsed once, the engine chosen once; both engines share the output folder's
handling (`fusemerge.merge.output`: lock, state manifest, refusing a foreign folder, recipe and card).
A streaming merge that was interrupted resumes where it stopped when rerun: finished shards are kept.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.writer import ShardedWriter
from fusemerge.errors import FusemergeError
from fusemerge.merge.fallback import run_with_mergekit
from fusemerge.merge.options import MergeOptions
from fusemerge.merge.output import claimed_output, mark_complete, write_record
from fusemerge.merge.plan import build_plan, describe
from fusemerge.merge.recipe import LoadedRecipe, read_recipe
from fusemerge.merge.routing import choose_engine
from fusemerge.merge.side_files import plan_card, resolve_side_files, write_side_files
from fusemerge.yaml_recipes import with_recipe_line

LOG = logging.getLogger(__name__)


def run_merge(
    recipe: str | Path,
    out: str | Path,
    options: MergeOptions | None = None,
    *,
    echo: Callable[[str], Any] = print,
    **overrides: Any,
) -> Path:
    """Merge the models of `recipe` into the folder `out`; returns `out`.

    Args:
        recipe: a mergekit-style YAML recipe (or mergekit-moe's experts format).
        out: the output folder; created if missing.
        options: how the merge runs (see `MergeOptions`); defaults when omitted.
        echo: where one-line status messages go.
        **overrides: `MergeOptions` fields by keyword (`progress=False`), applied over `options`.
    """
    options = replace(options or MergeOptions(), **overrides)
    out = Path(out)
    source = read_recipe(recipe)

    def warn(notice: FusemergeError) -> None:  # on stderr, beside the errors
        print(
            f"fusemerge: warning: {with_recipe_line(notice, source.path, source.text).one_line()}",
            file=sys.stderr,
        )

    try:
        chosen, why = choose_engine(options.engine, source)
        if chosen == "mergekit":
            echo(f"engine: mergekit ({why})")
            return run_with_mergekit(source, out, options, echo=echo, echo_warning=warn)
        if source.loaded is None:
            raise FusemergeError(
                "a MoE recipe (experts) needs --engine mergekit or auto", file=source.path, key="experts"
            )
        return _run_streaming(source.loaded, out, options, why=why, echo=echo, warn=warn)
    except FusemergeError as exc:  # every recipe error names its file:line, wherever it was found
        located = with_recipe_line(exc, source.path, source.text)
        if located is exc:
            raise
        raise located from exc.__cause__


def _run_streaming(
    loaded: LoadedRecipe,
    out: Path,
    options: MergeOptions,
    *,
    why: str,
    echo: Callable[[str], Any],
    warn: Callable[[FusemergeError], None],
) -> Path:
    plan = build_plan(
        loaded,
        out_shard_size=options.out_shard_size,
        allow_pickle=options.allow_pickle,
        random_seed=options.random_seed,
        strict=options.strict,
        warn=warn,
    )
    echo(f"engine: streaming ({why})")
    device = _check_device(options.device)
    side = resolve_side_files(plan)
    if options.dry_run:
        echo(describe(plan, out, device))
        return out

    fingerprint = plan.fingerprint()
    with claimed_output(out, fingerprint, overwrite=options.overwrite, resumable=True) as fresh:
        if not fresh:
            echo(f"{out}: this merge is already complete; nothing to do")
            return out
        writer = ShardedWriter(out, plan.shards)
        finished = writer.finished_shards()
        if finished:
            echo(f"resuming: {len(finished)} of {len(plan.shards)} shard(s) already complete")
        from fusemerge.merge.engine import execute  # the threads and kernels, not needed for a dry run

        execute(
            plan,
            writer,
            skip_shards=finished,
            device=device,
            progress=options.progress,
            allow_nonfinite=options.allow_nonfinite,
        )
        writer.publish()
        write_side_files(plan, side, out)
        write_record(out, plan.loaded.text, plan_card(plan))
        writer.write_index()
        mark_complete(out, fingerprint)
    echo(f"merged {len(plan.tasks)} tensors into {out} ({len(plan.shards)} shard(s))")
    return out


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
