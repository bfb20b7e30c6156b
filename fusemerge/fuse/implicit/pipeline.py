"""Implicit fusion as `fusemerge fuse` steps: sample -> score -> pairs -> sft -> preference.

    from fusemerge.fuse.implicit.pipeline import run_implicit
    run_implicit(recipe, steps=["sample", "score", "pairs", "sft", "preference"])

`fusemerge.fuse.pipeline.run_fuse` calls this for a recipe with `fusion: {kind: implicit}`; the steps
themselves are the modules beside this one (run_sample, run_score, run_pairs, run_sft, run_preference),
each resumable and kill -9 safe on its own. What this module adds is the order, the folders (all from
`fusemerge.fuse.workdir.FuseWorkDir`), and one lock on `<work_dir>/implicit/` for the whole run: `pairs`
takes none of its own, and two runs of one recipe would otherwise race on the same stage files.

Prepared data (`implicit.sft_data`, `implicit.preference_data`) replaces the pairs step's file for its
stage; when it covers every stage, sample, score and pairs have nothing to do and say so.

Under `accelerate launch` (or torchrun) `sample` runs on every process, each generating its share of the
shards (`fusemerge.fuse.implicit.sample`: the same files as one process); the main process then runs
score and pairs while the others wait; sft and preference run on every process, as explicit fusion's
training does.

`implicit.targets: per_domain` trains the stages once per domain of `implicit.domains`, each on that
domain's records of the same stage files (sample, score and pairs run once, for all of them), into
`<pivot>-implicit-sft-<domain>` and `<pivot>-implicit-<domain>`, then writes `<output>/merge.yml`: the
VaRM merge of the domains' final targets with the pivot as base, by explicit fusion's own writer.

Returned keys: "samples/<model>", "scores/<model>", "pairs/sft", "pairs/preference", and
"target/<name>" for each trained target (the SFT target, then the preference target built on it), and
"merge_recipe" when one was written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.layout import exclusive_lock
from fusemerge.errors import FusemergeError
from fusemerge.fuse.hf_compat import launched_rank_zero
from fusemerge.fuse.implicit.spec import DataFileSpec, ImplicitSpec, domain_slug
from fusemerge.fuse.recipe import FuseRecipe, ModelSpec
from fusemerge.fuse.workdir import FuseWorkDir, write_merge_recipe

DATA_STEPS = ("sample", "score", "pairs")


def implicit_spec(recipe: FuseRecipe) -> ImplicitSpec:
    """The recipe's `implicit:` section (FuseRecipe refuses an implicit recipe without one)."""
    if recipe.implicit is None:
        raise FusemergeError("fusion.kind: implicit needs an implicit: section", key="implicit")
    return recipe.implicit


def generated_stages(spec: ImplicitSpec) -> list[str]:
    """The training stages whose data the pairs step makes (those without prepared data)."""
    prepared = {"sft": spec.sft_data, "preference": spec.preference_data}
    return [stage for stage in spec.stages if prepared[stage] is None]


def implicit_repo_ids(recipe: FuseRecipe, repo_id: str) -> dict[Path, str]:
    """Where `--push-to-hub REPO_ID` puts the fused model (the last stage's target), checked before work.

    REPO_ID itself; a namespace alone (`me/`) puts it under its folder name (`me/<pivot>-implicit`). With
    `implicit.targets: per_domain`, each domain's final target: `REPO_ID-<domain>` (or its folder name
    under a namespace), as explicit fusion's pairwise targets go to `REPO_ID-<source>`.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    layout = FuseWorkDir(recipe)
    ids = {}
    for domain, target in zip(layout.implicit_domains, layout.implicit_final_targets, strict=True):
        if repo_id.endswith("/"):
            rid = f"{repo_id}{target.name}"
        else:
            rid = repo_id if domain is None else f"{repo_id}-{domain_slug(domain)}"
        try:
            validate_repo_id(rid)
        except HFValidationError as exc:
            reason = str(exc).rsplit(": '", 1)[0]
            raise FusemergeError(
                f"{rid!r} is not a valid Hub repo id: {reason}", key="--push-to-hub"
            ) from None
        ids[layout.target_folder(target)] = rid
    return ids


def run_implicit(
    recipe: FuseRecipe,
    *,
    steps: Sequence[str],
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run the requested implicit steps in order; finished work is skipped. Returns the folders (see above).

    Args:
        recipe: a validated recipe with `fusion.kind: implicit`.
        steps: the steps to run (`fusemerge.fuse.checked_steps`: known, in pipeline order).
        progress: progress bars.
        echo: where one-line status messages go.
    """
    from fusemerge.fuse.hf_compat import launched_state, wait_for_everyone

    layout = FuseWorkDir(recipe)
    state = launched_state()  # the launcher's process group, on the CPU too
    main = launched_rank_zero()  # not a PartialState's view before launched_state: see launched_rank_zero
    layout.implicit_dir.mkdir(parents=True, exist_ok=True)
    lock: AbstractContextManager[None] = (
        exclusive_lock(layout.implicit_dir, what="implicit fuse") if main else nullcontext()
    )
    folders: dict[str, Path] = {}
    with lock:
        if any(s in steps for s in DATA_STEPS):
            folders.update(data_steps(recipe, layout, steps=steps, main=main, progress=progress, echo=echo))
        wait_for_everyone(state)  # patient: the main process may score for hours
        folders.update(training_steps(recipe, layout, steps=steps, progress=progress, echo=echo))
    return folders


def data_steps(
    recipe: FuseRecipe,
    layout: FuseWorkDir,
    *,
    steps: Sequence[str],
    main: bool = True,
    progress: bool,
    echo: Callable[[str], None],
) -> dict[str, Path]:
    """sample, score and pairs over every answering model (skipped when prepared data covers all stages).

    Every process of a launched run calls this: each samples its share; only the main one (`main`)
    reports, scores and pairs.
    """
    from fusemerge.fuse.implicit.pairs import run_pairs
    from fusemerge.fuse.implicit.score import run_score
    from fusemerge.fuse.implicit.scorers import ScorerContext

    spec = implicit_spec(recipe)
    if not main:
        progress, echo = False, lambda _: None
    if not generated_stages(spec):
        for step in (s for s in DATA_STEPS if s in steps):
            echo(
                f"{step}: nothing to do, prepared data (implicit.sft_data / preference_data) covers every stage"
            )
        return {}
    folders: dict[str, Path] = {}
    answering = layout.answering
    wanted = "sample" in steps or ("score" in steps and main)
    prompts = load_prompts(recipe, echo=echo) if wanted else None
    if "sample" in steps:
        from fusemerge.fuse.implicit.sample import run_sample

        assert prompts is not None
        for name, model in answering:
            folder = layout.samples_folder(name)
            run_sample(
                model=sample_model(name, model),
                prompts=prompts,
                spec=spec.sampling,
                folder=folder,
                progress=progress,
                echo=echo,
            )
            folders[f"samples/{name}"] = folder
    if not main:
        return folders
    if "score" in steps:
        assert prompts is not None
        context = ScorerContext(spec.scoring, progress=progress)  # one reward model load for every model
        for name, _ in answering:
            folder = layout.scores_folder(name)
            run_score(
                name=name,
                samples=layout.samples_folder(name),
                folder=folder,
                prompts=prompts,
                spec=spec.scoring,
                context=context,
                progress=progress,
                echo=echo,
            )
            folders[f"scores/{name}"] = folder
    if "pairs" in steps:
        pivot = layout.pivot_name if spec.sampling.include_pivot else None
        run_pairs(
            scores={name: layout.scores_folder(name) for name, _ in answering},
            pivot=pivot,
            folder=layout.implicit_dir,
            spec=spec.pairs,
            progress=progress,
            echo=echo,
        )
        folders["pairs/sft"] = layout.sft_pairs
        folders["pairs/preference"] = layout.preference_pairs
    return folders


def training_steps(
    recipe: FuseRecipe,
    layout: FuseWorkDir,
    *,
    steps: Sequence[str],
    progress: bool,
    echo: Callable[[str], None],
) -> dict[str, Path]:
    """sft then preference, each on the recipe's `implicit.stages`; preference trains the SFT target.

    With `implicit.targets: per_domain`, each domain's targets in turn, on its own records of the same
    stage files (split here, checked whole before the first target trains), then <output>/merge.yml over
    the domains' final targets (`fusemerge.fuse.workdir.write_merge_recipe`, explicit fusion's writer).
    """
    spec = implicit_spec(recipe)
    folders: dict[str, Path] = {}
    for step in ("sft", "preference"):
        if step in steps and step not in spec.stages:
            echo(f"{step}: not among implicit.stages ({', '.join(spec.stages)}), skipped")
    domains = layout.implicit_domains
    if "preference" in steps and "sft" in spec.stages and "sft" not in steps:
        for domain in domains:  # before any data is read: the step to run first is the clearer message
            require_sft_target(layout, domain)
    data = {stage: domain_records(recipe, layout, stage, domains) for stage in spec.stages if stage in steps}
    if len(domains) > 1:  # a later stage's data, when it is there, is checked too: before hours of SFT
        for stage in (s for s in spec.stages if s not in steps and stage_data_exists(recipe, layout, s)):
            domain_records(recipe, layout, stage, domains)
    for domain in domains:
        folders.update(domain_targets(recipe, layout, domain, data=data, progress=progress, echo=echo))
    if len(domains) > 1 and spec.stages[-1] in steps and launched_rank_zero():
        finals = [layout.target_folder(t) for t in layout.implicit_final_targets]
        merge_recipe = write_merge_recipe(recipe, finals)
        folders["merge_recipe"] = merge_recipe
        echo(f"merge recipe: {merge_recipe} (the {len(finals)} domains' targets)")
        echo(f"next: fusemerge merge {merge_recipe} {layout.merged_folder}")
    return folders


def domain_targets(
    recipe: FuseRecipe,
    layout: FuseWorkDir,
    domain: str | None,
    *,
    data: dict[str, dict[str | None, tuple[list[Any], DataFileSpec]]],
    progress: bool,
    echo: Callable[[str], None],
) -> dict[str, Path]:
    """One domain's targets (every domain's when `domain` is None): sft, then preference from it.

    Args:
        data: stage -> domain -> (its records, the file they came from), for the requested stages.
    """
    targets = layout.implicit_targets(domain)
    folders: dict[str, Path] = {}
    if "sft" in data:
        from fusemerge.fuse.implicit.sft import run_sft

        target = targets["sft"]
        records, source = data["sft"][domain]
        folders[target.key] = run_sft(
            recipe=recipe,  # type: ignore[arg-type]  # FuseRecipe.implicit is set for this kind
            records=records,
            out=layout.target_folder(target),
            checkpoints=layout.checkpoints(target),
            max_length=recipe.dataset.max_length if recipe.dataset is not None else 2048,
            data_names=data_names(recipe, source, domain),
            progress=progress,
            echo=echo,
        )
    if "preference" in data:
        from fusemerge.fuse.implicit.preference import run_preference

        target = targets["preference"]
        # FuseChat-3.0: DPO starts from the SFT model, which must be finished
        policy = require_sft_target(layout, domain) if "sft" in targets else None
        pairs, source = data["preference"][domain]
        folders[target.key] = run_preference(
            recipe=recipe,  # type: ignore[arg-type]
            pairs=pairs,
            out=layout.target_folder(target),
            checkpoints=layout.checkpoints(target),
            policy=policy,
            data_names=data_names(recipe, source, domain),
            progress=progress,
            echo=echo,
        )
    return folders


def domain_records(
    recipe: FuseRecipe, layout: FuseWorkDir, stage: str, domains: Sequence[str | None]
) -> dict[str | None, tuple[list[Any], DataFileSpec]]:
    """A stage's records by domain (all under None when there is one target), and the file they came from.

    Per domain, every record must name one of `implicit.domains` (the pairs step's files always carry
    `domain`; prepared data must), and every domain must have records: a target trained on nothing, or
    a domain's records silently left out of every target, is refused before anything trains.
    """
    from fusemerge.fuse.implicit.datasets import read_preference_data, read_sft_data

    spec, key = stage_data(recipe, layout, stage)
    read = read_sft_data if stage == "sft" else read_preference_data
    records: list[Any] = list(read(spec=spec, key=key))
    if domains == [None]:
        return {None: (records, spec)}
    of_line = record_domains(spec, key)
    split: dict[str | None, tuple[list[Any], DataFileSpec]] = {d: ([], spec) for d in domains}
    for record in records:
        domain = of_line.get(record.line)
        if domain is None:
            raise FusemergeError(
                "no 'domain' (a string): implicit.targets: per_domain trains each domain's target on the "
                "records that name it",
                file=spec.path,
                line=record.line,
                key=key,
            )
        if domain not in split:
            listed = ", ".join(str(d) for d in domains)
            raise FusemergeError(
                f"domain {domain!r} is not among implicit.domains ({listed}): add it, or leave its "
                "records out of the data",
                file=spec.path,
                line=record.line,
                key="implicit.domains",
            )
        split[domain][0].append(record)
    for domain, (kept, _) in split.items():
        if not kept:
            raise FusemergeError(
                f"no {stage} records of domain {domain!r}: its target would learn nothing (the pairs step "
                "keeps a prompt only when its responses make a pair; more prompts or samples of it help)",
                file=spec.path,
                key="implicit.domains",
            )
    return split


def record_domains(spec: DataFileSpec, key: str) -> dict[int, str]:
    """line (or row) -> the record's `domain`, for every record of a data file that names one."""
    from fusemerge.lm.chat import read_records

    try:
        rows = read_records(spec.path, spec.split)
        return {
            line: record["domain"]
            for line, record in rows
            if isinstance(record, dict) and isinstance(record.get("domain"), str)
        }
    except FusemergeError as exc:  # read once already by the stage's reader: only a vanished file gets here
        raise FusemergeError(exc.message, file=spec.path, key=key) from None


def stage_data(recipe: FuseRecipe, layout: FuseWorkDir, stage: str) -> tuple[DataFileSpec, str]:
    """A stage's data file and the recipe key errors name: the prepared data, else the pairs step's file."""
    spec = implicit_spec(recipe)
    prepared = spec.sft_data if stage == "sft" else spec.preference_data
    if prepared is not None:
        return prepared, f"implicit.{stage}_data"
    path = layout.sft_pairs if stage == "sft" else layout.preference_pairs
    if not path.is_file():
        raise FusemergeError(
            f"no {stage} data: run the pairs step first (--steps sample,score,pairs), or give "
            f"implicit.{stage}_data",
            file=path,
        )
    return DataFileSpec(path=str(path)), f"pairs ({path.name})"


def stage_data_exists(recipe: FuseRecipe, layout: FuseWorkDir, stage: str) -> bool:
    """Whether a stage's data is there to read: its prepared file, or the pairs step's."""
    spec = implicit_spec(recipe)
    prepared = spec.sft_data if stage == "sft" else spec.preference_data
    if prepared is not None:
        return Path(prepared.path).exists()
    return (layout.sft_pairs if stage == "sft" else layout.preference_pairs).is_file()


def data_names(recipe: FuseRecipe, data: DataFileSpec, domain: str | None = None) -> list[str]:
    """What the model card names as the training data: the prepared file, or the prompts it came from
    (a domain's target, `implicit.targets: per_domain`: only that domain's records of them)."""
    spec = implicit_spec(recipe)
    if data in (spec.sft_data, spec.preference_data) or recipe.dataset is None:
        return [data.path if domain is None else f"{data.path} (its records of domain {domain})"]
    scorers = sorted({spec.scoring.default, *spec.scoring.domains.values()})
    only = "" if domain is None else f"domain {domain}; "
    return [f"{recipe.dataset.path} (prompts; {only}responses of the sources scored by {', '.join(scorers)})"]


def require_sft_target(layout: FuseWorkDir, domain: str | None) -> Path:
    """The finished SFT target the preference stage of `domain` starts from; none is a FusemergeError."""
    policy = layout.target_folder(layout.implicit_targets(domain)["sft"])
    if not target_complete(policy):
        raise FusemergeError(
            "no finished SFT target to start the preference stage from; run the sft step first "
            "(--steps sft,preference)",
            file=policy,
        )
    return policy


def target_complete(folder: Path) -> bool:
    """Whether a target folder is finished (its stamp is written last, inside the staged folder)."""
    from fusemerge.checkpoint.layout import TARGET_STAMP

    return (folder / TARGET_STAMP).is_file()


def load_prompts(recipe: FuseRecipe, *, echo: Callable[[str], None] = print) -> Any:
    """The recipe's prompts (`dataset`): every record's last user turn, its domain and its gold data."""
    from fusemerge.fuse.implicit.prompts import read_prompts

    if recipe.dataset is None:
        raise FusemergeError("sample and score need the prompts: give dataset.path", key="dataset")
    ds = recipe.dataset
    prompts = read_prompts(
        path=ds.path, split=ds.split, fmt=ds.format, limit=ds.limit, on_bad_record=ds.on_bad_record
    )
    extra = "".join(
        f", {n} {what}"
        for n, what in ((len(prompts.skipped), "skipped"), (prompts.duplicates, "duplicates dropped"))
        if n
    )
    echo(f"prompts: {len(prompts.prompts)} from {ds.path}{extra}")
    return prompts


def sample_model(name: str, spec: ModelSpec) -> Any:
    """A recipe model as the sample step loads it: its own chat template (each source answers in its own)."""
    from fusemerge.fuse.implicit.generate import LoadSettings
    from fusemerge.fuse.implicit.sample import SampleModel

    load = LoadSettings(
        dtype=spec.dtype or "auto",
        device=spec.device or "auto",
        load_in_4bit=spec.load_in_4bit,
        allow_pickle=spec.allow_pickle,
        trust_remote_code=spec.trust_remote_code,
    )
    return SampleModel(name=name, model=spec.model, load=load)
