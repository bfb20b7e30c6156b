"""`fuse` as a sequence of resumable steps over a recipe: teach, align (then train, a later issue).

    from fusemerge.fuse.pipeline import run_fuse
    run_fuse("recipes/fusechat-7b.yml", steps=("teach", "align"))

Folders under the recipe's work_dir (default <output>/work):

    teacher/<model-name>/                    top-K store of the pivot and of every source (fusemerge.fuse.store)
    vocab/<source>-to-<pivot>.safetensors    each source's vocabulary mapping (fusemerge.fuse.aligned)
    aligned/<source>/                        each source's top-K in pivot positions and ids (fusemerge.fuse.aligned)

Every step reads only the previous step's files and skips what is already complete, so an interrupted
run continues with the same command. The training stage opens the results with
`fusemerge.fuse.inputs.open_fusion_inputs`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fusemerge.errors import FusemergeError
from fusemerge.fuse.recipe import FuseRecipe, ModelSpec, load_fuse_recipe

STEPS = ("teach", "align")


def run_fuse(
    recipe_path: str | Path,
    *,
    steps: Iterable[str] = ("teach",),
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run the requested steps of the fuse recipe; returns the folders they made or checked.

    Keys: the teach step's stores by role ("pivot", "source1", ...), the align step's by
    "aligned/<role>" ("aligned/source1", ...).

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
    if "teach" not in steps:
        _require_teacher_stores(recipe)
    pivot_tokenizer, data = chat_data(recipe, echo=echo)
    folders: dict[str, Path] = {}
    if "teach" in steps:
        folders.update(teach(recipe, data, progress=progress, echo=echo))
    if "align" in steps:
        folders.update(align(recipe, data, pivot_tokenizer, progress=progress, echo=echo))
    return folders


def chat_data(recipe: FuseRecipe, *, echo: Callable[[str], None] = print) -> tuple[Any, Any]:
    """The pivot's tokenizer and the dataset rendered with its template: the text every step reads."""
    from fusemerge.fuse.data import build_chat_data
    from fusemerge.fuse.teacher import load_teacher_tokenizer

    pivot_tokenizer = load_teacher_tokenizer(
        recipe.pivot.model, trust_remote_code=recipe.pivot.trust_remote_code
    )
    data = build_chat_data(recipe.dataset, pivot_tokenizer, recipe.chat_template, warn=echo)
    skipped = f", {len(data.skipped)} skipped" if data.skipped else ""
    echo(f"dataset: {data.records} records -> {len(data.sequences)} sequences{skipped}")
    return pivot_tokenizer, data


def teach(
    recipe: FuseRecipe, data: Any, *, progress: bool = True, echo: Callable[[str], None] = print
) -> dict[str, Path]:
    """The teacher pass for the pivot and every source, over the text rendered with the pivot's template."""
    from fusemerge.fuse.teacher import TeacherSettings, run_teacher

    stores = {}
    for (role, spec), folder in zip(recipe.models, store_folders(recipe), strict=True):
        settings = TeacherSettings(**recipe.teacher_settings(spec))
        run_teacher(spec.model, data, folder, settings=settings, progress=progress, echo=echo)
        stores[role] = folder
    return stores


def align(
    recipe: FuseRecipe,
    data: Any,
    pivot_tokenizer: Any,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Every source's teacher store moved into the pivot's positions and vocabulary (skipped when done).

    CPU work: under `accelerate launch` the main process does it while the others wait, so that no two
    processes write one store.
    """
    from accelerate import PartialState

    from fusemerge.fuse.aligned import run_align
    from fusemerge.fuse.teacher import load_teacher_tokenizer

    _require_teacher_stores(recipe)
    teacher = store_folders(recipe)
    out = {}
    sources = recipe.models[1:]
    state = PartialState()
    for (role, spec), store, folder, mapping in zip(
        sources, teacher[1:], aligned_folders(recipe), mapping_files(recipe), strict=True
    ):
        out[f"aligned/{role}"] = folder
        if not state.is_main_process:
            continue
        tokenizer = load_teacher_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
        run_align(
            tokenizer,
            pivot_tokenizer,
            data,
            source_store=store,
            pivot_store=teacher[0],
            aligned_dir=folder,
            mapping_file=mapping,
            tokens=recipe.alignment.tokens,
            vocab=recipe.alignment.vocab,
            progress=progress,
            echo=echo,
        )
    state.wait_for_everyone()
    return out


def store_folders(recipe: FuseRecipe) -> list[Path]:
    """work_dir/teacher/<name> per model (pivot first); names made unique when two models share one."""
    root = recipe.work_path / "teacher"
    return [root / n for n in _names(recipe)]


def aligned_folders(recipe: FuseRecipe) -> list[Path]:
    """work_dir/aligned/<source name> per source, in recipe order."""
    return [recipe.work_path / "aligned" / n for n in _names(recipe)[1:]]


def mapping_files(recipe: FuseRecipe) -> list[Path]:
    """work_dir/vocab/<source name>-to-<pivot name>.safetensors per source, in recipe order."""
    pivot, *sources = _names(recipe)
    return [recipe.work_path / "vocab" / f"{s}-to-{pivot}.safetensors" for s in sources]


def _require_teacher_stores(recipe: FuseRecipe) -> None:
    for (_, spec), folder in zip(recipe.models, store_folders(recipe), strict=True):
        if not (folder / "manifest.json").is_file():
            raise FusemergeError(
                f"no teacher store for {spec.name}; run the teach step first (--steps teach,align)",
                file=folder,
            )


def _names(recipe: FuseRecipe) -> list[str]:
    names = [_slug(spec) for _, spec in recipe.models]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def _slug(spec: ModelSpec) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.name).strip("-") or "model"
