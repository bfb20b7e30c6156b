"""`fuse` as a sequence of resumable steps over a recipe: teach (now), then align and train (later issues).

    from fusemerge.fuse.pipeline import run_fuse
    run_fuse("recipes/fusechat-7b.yml", steps=("teach",))

Folders under the recipe's work_dir (default <output>/work):

    teacher/<model-name>/     the top-K store of the pivot and of every source (fusemerge.fuse.store)

Every step reads only the previous step's files and skips what is already complete, so an interrupted
run continues with the same command.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from fusemerge.errors import FusemergeError
from fusemerge.fuse.recipe import FuseRecipe, ModelSpec, load_fuse_recipe

STEPS = ("teach",)


def run_fuse(
    recipe_path: str | Path,
    *,
    steps: Iterable[str] = ("teach",),
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run the requested steps of the fuse recipe; returns each model's teacher store folder by role.

    Args:
        recipe_path: the fuse recipe (YAML).
        steps: any of `STEPS`, run in pipeline order whatever order they are given in.
        progress: progress bars (per model: sequences, tokens/s, ETA).
        echo: where one-line status messages go.
    """
    steps = [s.strip() for s in steps if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise FusemergeError(f"unknown step {unknown[0]!r}; steps are {', '.join(STEPS)}", key="--steps")
    if not steps:
        raise FusemergeError(f"no step to run; steps are {', '.join(STEPS)}", key="--steps")
    recipe = load_fuse_recipe(recipe_path)
    stores: dict[str, Path] = {}
    if "teach" in steps:
        stores = teach(recipe, progress=progress, echo=echo)
    return stores


def teach(
    recipe: FuseRecipe, *, progress: bool = True, echo: Callable[[str], None] = print
) -> dict[str, Path]:
    """The teacher pass for the pivot and every source, over the text rendered with the pivot's template."""
    from fusemerge.fuse.data import build_chat_data
    from fusemerge.fuse.teacher import TeacherSettings, load_teacher_tokenizer, run_teacher

    pivot_tokenizer = load_teacher_tokenizer(
        recipe.pivot.model, trust_remote_code=recipe.pivot.trust_remote_code
    )
    data = build_chat_data(recipe.dataset, pivot_tokenizer, recipe.chat_template, warn=echo)
    skipped = f", {len(data.skipped)} skipped" if data.skipped else ""
    echo(f"dataset: {data.records} records -> {len(data.sequences)} sequences{skipped}")
    stores = {}
    for (role, spec), folder in zip(recipe.models, store_folders(recipe), strict=True):
        settings = TeacherSettings(**recipe.teacher_settings(spec))
        run_teacher(spec.model, data, folder, settings=settings, progress=progress, echo=echo)
        stores[role] = folder
    return stores


def store_folders(recipe: FuseRecipe) -> list[Path]:
    """work_dir/teacher/<name> per model (pivot first); names made unique when two models share one."""
    names = [_slug(spec) for _, spec in recipe.models]
    root = recipe.work_path / "teacher"
    return [root / (n if names.count(n) == 1 else f"{n}-{i}") for i, n in enumerate(names)]


def _slug(spec: ModelSpec) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.name).strip("-") or "model"
