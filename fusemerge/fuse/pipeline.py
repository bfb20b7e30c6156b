"""`fuse` as a sequence of resumable steps over a recipe: teach -> align -> train.

    from fusemerge.fuse.pipeline import run_fuse
    run_fuse("recipes/fusechat-7b.yml", steps=("teach", "align", "train"))

The folders and names each step uses come from `fusemerge.fuse.workdir.FuseWorkDir`.

A recipe with `fusion: {kind: implicit}` (FuseChat-3.0) goes to `fusemerge.fuse.implicit.pipeline`
(sample -> score -> pairs -> sft -> preference) and `dry_run` to `fusemerge.fuse.plan`, both from
`run_fuse`, so that the CLI, the demo and the Python API have one entry point.

Every step reads only the previous step's files and skips what is already complete, so an interrupted
run continues with the same command. The training stage opens the results with
`fusemerge.fuse.inputs.open_fusion_inputs`.

With `push_to_hub`, the finished targets are uploaded at the end (`hub_repo_ids` says where): one target
goes to the repo id as given; several go to `<repo id>-<source name>` each; a namespace alone (`me/`)
puts each under its folder name. The ids are checked before any work starts.

A fine-tune recipe (`fusion.function: none`, or `lambda: 1`) has no teach or align work: it trains
`<pivot>-finetune` on the data alone. With `baseline`, a fusion recipe also trains that fine-tune, its
CLM-only baseline (`FuseRecipe.baseline`), beside its targets (same data, training and output). The run
ends with one line saying how much disk it still holds, and where (`fusemerge.fuse.workdir.disk_line`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.layout import exclusive_lock
from fusemerge.errors import FusemergeError
from fusemerge.fuse import checked_steps
from fusemerge.fuse.hf_compat import launched_rank_zero, launched_state, wait_for_everyone
from fusemerge.fuse.inputs import check_fuse_inputs, check_writable_folders
from fusemerge.fuse.recipe import FuseRecipe, load_fuse_recipe
from fusemerge.fuse.workdir import FuseWorkDir, disk_line, write_merge_recipe  # merge.yml: workdir's


def run_fuse(
    recipe_path: str | Path,
    *,
    steps: Iterable[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    push_to_hub: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    baseline: bool = False,
) -> dict[str, Path]:
    """Run the requested steps of the fuse recipe; returns the folders they made or checked.

    Keys: the teach step's stores by role ("pivot", "source1", ...), the align step's by
    "aligned/<role>" ("aligned/source1", ...), the train step's target folders by "target/<name>"
    and the merge recipe it wrote as "merge_recipe". An implicit recipe (`fusion.kind: implicit`) runs
    `fusemerge.fuse.implicit.pipeline.run_implicit` instead (its keys are described there).

    Args:
        recipe_path: the fuse recipe (YAML).
        steps: any of the recipe kind's steps (`STEPS`, `IMPLICIT_STEPS`), run in pipeline order whatever
            order they are given in; None: all of them.
        progress: progress bars (per model: sequences, tokens/s, ETA).
        echo: where one-line status messages go.
        push_to_hub: upload the targets when trained (see `hub_repo_ids`); needs the train step.
        private: create the Hub repos private (an existing repo keeps its visibility).
        dry_run: validate the recipe and print the plan (`fusemerge.fuse.plan`); nothing is loaded or run.
        baseline: also train the recipe's CLM-only baseline (`<pivot>-finetune`) after its targets; it is
            not pushed and not part of the merge.
    """
    if private and not push_to_hub:
        raise FusemergeError("--private only applies with --push-to-hub", key="--private")
    recipe = load_fuse_recipe(recipe_path)
    steps = checked_steps(steps, kind=recipe.fusion.kind)
    last = final_step(recipe)
    if push_to_hub and last not in steps:
        raise FusemergeError(
            f"the trained targets are what is pushed: add the {last} step (finished targets are skipped)",
            key="--push-to-hub",
        )
    if baseline and (recipe.fine_tune or recipe.fusion.kind == "implicit"):
        raise FusemergeError(
            "the recipe is a fine-tune already (fusion.function none or lambda 1): it is the baseline"
            if recipe.fine_tune
            else "--baseline is explicit fusion's CLM-only twin; an implicit recipe's SFT target is its baseline",
            key="--baseline",
        )
    if dry_run:
        from fusemerge.fuse.plan import print_plan

        print_plan(recipe, recipe_path=Path(recipe_path), steps=steps, push_to_hub=push_to_hub, echo=echo)
        return {}
    repo_ids = _repo_ids(recipe, push_to_hub) if push_to_hub else {}  # before anything is made on disk
    layout = FuseWorkDir(recipe)
    main = launched_rank_zero()
    if main:  # the lock below is a file in the work folder: an unwritable one is named by its key first
        check_writable_folders(recipe, steps, recipe_path=recipe_path)
    # one fuse per work dir: a second one would resume from the first one's checkpoints and train into
    # the same folders; flock dies with its holder, so a killed run never blocks the next one
    with exclusive_lock(layout.root, what="fuse") if main else nullcontext():
        if main:
            layout.remove_orphans(echo)
            if recipe.fusion.kind != "implicit" and not recipe.fine_tune:
                layout.drop_stale_stores(rebuild="teach" in steps, echo=echo)
        wait_for_everyone(launched_state())  # the launcher's group on the CPU too (hf_compat)
        return _run_steps(
            recipe,
            Path(recipe_path),
            steps,
            progress=progress,
            echo=echo,
            repo_ids=repo_ids,
            private=private,
            baseline=baseline,
        )


def _repo_ids(recipe: FuseRecipe, push_to_hub: str) -> dict[Path, str]:
    """Where `--push-to-hub` puts each target, for either kind of recipe (refused here when invalid)."""
    if recipe.fusion.kind == "implicit":
        from fusemerge.fuse.implicit.pipeline import implicit_repo_ids

        return implicit_repo_ids(recipe, push_to_hub)
    return hub_repo_ids(recipe, push_to_hub)


def _run_steps(
    recipe: FuseRecipe,
    recipe_path: Path,
    steps: list[str],
    *,
    progress: bool,
    echo: Callable[[str], None],
    repo_ids: dict[Path, str],
    private: bool,
    baseline: bool,
) -> dict[str, Path]:
    """`run_fuse` once the recipe is checked and the work dir is this run's."""
    if recipe.fusion.kind == "implicit":
        from fusemerge.fuse.implicit.pipeline import run_implicit

        done = run_implicit(recipe, steps=steps, progress=progress, echo=echo)
        if repo_ids:
            push_targets(repo_ids, private=private, echo=echo)
        return done
    runs = [recipe, recipe.baseline()] if baseline else [recipe]
    checks = check_fuse_inputs(recipe, steps, recipe_path=recipe_path)  # before any model is run
    if "teach" not in steps and not recipe.fine_tune:  # align and train read them: checked once, first
        FuseWorkDir(recipe).require_teacher_stores()
    pivot_tokenizer, data = chat_data(recipe, echo=echo)
    checks.check_data(data, echo=echo)  # the teachers' unknown-token share of this data
    folders: dict[str, Path] = {}
    if recipe.fine_tune and ("teach" in steps or "align" in steps):
        echo("teach, align: nothing to do for a fine-tune (no teachers: fusion.function none or lambda 1)")
    elif "teach" in steps:
        folders.update(teach(recipe, data, progress=progress, echo=echo))
    if "align" in steps and not recipe.fine_tune:
        folders.update(align(recipe, data, pivot_tokenizer, progress=progress, echo=echo))
    if "train" in steps:
        for run in runs:
            folders.update(train(run, data, progress=progress, echo=echo))
    if repo_ids:
        push_targets(repo_ids, private=private, echo=echo)
    from accelerate import PartialState

    if PartialState().is_main_process:
        targets = [path for key, path in folders.items() if key.startswith("target/")]
        echo(disk_line([FuseWorkDir(run) for run in runs], targets))
    return folders


def final_step(recipe: FuseRecipe) -> str:
    """The step that makes the finished targets (what `--push-to-hub` uploads): train, or the last stage."""
    if recipe.fusion.kind == "implicit" and recipe.implicit is not None:
        return recipe.implicit.stages[-1]
    return "train"


def hub_repo_ids(recipe: FuseRecipe, repo_id: str) -> dict[Path, str]:
    """Where `--push-to-hub REPO_ID` puts each target folder, checked before any work is done.

    - one target (one source, or `fusion.sources: all`): REPO_ID itself;
    - several targets (pairwise fusion of several sources): REPO_ID-<source name> each,
      e.g. me/OpenChat-3.5-7B -> me/OpenChat-3.5-7B-Nous-Hermes-2-SOLAR-10.7B;
    - a namespace alone, with its slash (me/): each target under its folder name, me/<pivot>-<source>.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from fusemerge.hub import check_repo_id

    check_repo_id(repo_id, option="--push-to-hub")
    layout = FuseWorkDir(recipe)
    plan = layout.targets
    if repo_id.endswith("/"):
        ids = {layout.target_folder(t): f"{repo_id}{t.name}" for t in plan}
    elif len(plan) == 1:
        ids = {layout.target_folder(plan[0]): repo_id}
    else:
        ids = {layout.target_folder(t): f"{repo_id}-{layout.source_names[t.members[0]]}" for t in plan}
    for target, rid in ids.items():
        try:
            validate_repo_id(rid)
        except HFValidationError as exc:
            derived = "" if rid == repo_id else f" (for the target {target.name})"
            reason = str(exc).rsplit(": '", 1)[0]
            raise FusemergeError(
                f"{rid!r}{derived} is not a valid Hub repo id: {reason}",
                key="--push-to-hub",
            ) from None
    return ids


def push_targets(
    repo_ids: dict[Path, str],
    *,
    private: bool = False,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Upload every finished target to its repo (`hub_repo_ids`); under a launcher the main process alone.

    Returns the commit URLs. A target folder holds its model card (README.md), the fuse recipe and the
    pivot's tokenizer; fusemerge's bookkeeping (`fusemerge_target.json`) stays local.
    """
    from accelerate import PartialState

    from fusemerge.hub import push_folder

    if not PartialState().is_main_process:
        return []
    urls = []
    for target, rid in repo_ids.items():
        urls.append(
            push_folder(
                target,
                rid,
                private=private,
                commit_message=f"Upload {target.name}, fused with fusemerge",
                echo=echo,
            )
        )
    return urls


def chat_data(recipe: FuseRecipe, *, echo: Callable[[str], None] = print) -> tuple[Any, Any]:
    """The pivot's tokenizer and the dataset rendered with its template: the text every step reads."""
    from fusemerge.fuse.data import build_chat_data
    from fusemerge.lm.loading import load_tokenizer

    assert recipe.dataset is not None  # an explicit recipe has one (FuseRecipe checks)
    pivot_tokenizer = load_tokenizer(recipe.pivot.model, trust_remote_code=recipe.pivot.trust_remote_code)
    data = build_chat_data(recipe.dataset, pivot_tokenizer, recipe.chat_template, warn=echo)
    skipped = f", {len(data.skipped)} skipped" if data.skipped else ""
    echo(f"dataset: {data.records} records -> {len(data.sequences)} sequences{skipped}")
    return pivot_tokenizer, data


def teach(
    recipe: FuseRecipe, data: Any, *, progress: bool = True, echo: Callable[[str], None] = print
) -> dict[str, Path]:
    """The teacher pass for the pivot and every source, over the text rendered with the pivot's template."""
    from fusemerge.fuse.teacher import TeacherSettings, check_weights_first, run_teacher

    check_weights_first([spec.model for _, spec in recipe.models], FuseWorkDir(recipe).teacher_stores)
    stores = {}
    for (role, spec), folder in zip(recipe.models, FuseWorkDir(recipe).teacher_stores, strict=True):
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
    processes write one store. The teacher stores must be complete (`run_fuse` checks that first).
    """
    from fusemerge.fuse.aligned import run_align
    from fusemerge.lm.loading import load_tokenizer

    layout = FuseWorkDir(recipe)
    teacher = layout.teacher_stores
    out = {}
    sources = recipe.models[1:]
    state = launched_state()
    for (role, spec), store, folder, mapping in zip(
        sources, teacher[1:], layout.aligned_stores, layout.mapping_files, strict=True
    ):
        out[f"aligned/{role}"] = folder
        if not state.is_main_process:
            continue
        tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
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
            workers=recipe.alignment.workers,
            spans=recipe.alignment.spans,
            progress=progress,
            echo=echo,
        )
    wait_for_everyone(state)  # patient: aligning a large dataset on one process outlasts NCCL's timeout
    return out


def train(
    recipe: FuseRecipe, data: Any, *, progress: bool = True, echo: Callable[[str], None] = print
) -> dict[str, Path]:
    """Train every target (one per source, or one from all), then write the merge recipe over them."""
    from accelerate import PartialState

    from fusemerge.fuse.inputs import open_fusion_inputs
    from fusemerge.fuse.train import train_target

    layout = FuseWorkDir(recipe)
    inputs = None if recipe.fine_tune else open_fusion_inputs(recipe)
    out: dict[str, Path] = {}
    for target in layout.targets:
        aligned = (
            {recipe.sources[i].model: inputs.sources[layout.source_names[i]] for i in target.members}
            if inputs
            else {}
        )
        out[target.key] = train_target(
            recipe,
            data,
            pivot_store=inputs.pivot if inputs else None,
            aligned=aligned,
            out=layout.target_folder(target),
            checkpoints=layout.checkpoints(target),
            progress=progress,
            echo=echo,
        )
    targets = list(out.values())
    if not PartialState().is_main_process:  # under a launcher: one process reports and writes merge.yml
        return out
    if recipe.fine_tune:
        echo(f"fine-tune (the CLM-only baseline): {targets[0]}")
        return out
    echo("targets: " + ", ".join(str(t) for t in targets))
    if len(targets) < 2:
        echo(f"one target, nothing to merge: the fused model is {targets[0]}")
        return out
    merge_recipe = write_merge_recipe(recipe, targets)
    out["merge_recipe"] = merge_recipe
    echo(f"merge recipe: {merge_recipe}")
    echo(f"next: fusemerge merge {merge_recipe} {layout.merged_folder}")
    return out
