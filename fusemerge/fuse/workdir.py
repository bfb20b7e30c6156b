"""The fuse work-dir layout: where every step of `fusemerge fuse` reads and writes, and what each target is called.

    from fusemerge.fuse.workdir import FuseWorkDir
    layout = FuseWorkDir(recipe)
    layout.teacher_stores[0]                        # work_dir/teacher/<pivot>
    for target in layout.targets:                   # the target plan
        layout.target_folder(target), layout.checkpoints(target)

Folders under the recipe's work_dir (default <output>/work):

    teacher/<model-name>/                    top-K store of the pivot and of every source (fusemerge.fuse.store)
    vocab/<source>-to-<pivot>.safetensors    each source's vocabulary mapping (fusemerge.fuse.aligned)
    aligned/<source>/                        each source's top-K in pivot positions and ids (fusemerge.fuse.aligned)
    train/<target>-<key>/                    Trainer checkpoints of each target (fusemerge.fuse.train), with
                                             fusemerge_train.json (what they were made for) and final/ (the
                                             trained weights before they are folded into the target folder);
                                             removed once the target is saved, unless training.keep_checkpoints

    implicit/                                implicit fusion (fusion.kind: implicit; fusemerge.fuse.implicit):
      samples/<model>/, scores/<model>/      every answering model's responses, then their scores
      sft.jsonl, preference.jsonl            the pairs step's SFT examples and preference pairs

and under the recipe's output:

    <pivot>-<source>/      one fused target per source (pairwise fusion, the paper), a model folder
    <pivot>-fused/         or one target from all sources at once (`fusion.sources: all`, FuseLLM)
    <pivot>-finetune/      or the plain fine-tune (`fusion.function: none`, or `fuse --baseline`)
    merge.yml              the next stage: `variation_ratio` over the targets with the pivot as base
    <pivot>-implicit-sft/  implicit fusion: the SFT target (the pivot trained on the best answers)
    <pivot>-implicit/      ... and the preference target trained from it (the final model)
    <pivot>-implicit[-sft]-<domain>/   or those per domain (`implicit.targets: per_domain`), merged by
                                       merge.yml as explicit fusion's targets are

Sharing a work_dir: the stores depend only on the models, the data and the teacher and alignment
settings, so recipes that differ in `fusion` or `training` share them (the teach step runs once). A train
folder's `<key>` is a hash of everything its training depends on (`train_key`), so two such recipes never
resume, or refuse, each other's checkpoints.

Why one object: the teach, align and train steps, the training inputs, the Hub push and the demo all
name these folders; each used to rebuild them (and the target names) on its own. A model's folder name
is its recipe name (`ModelSpec.name`) made safe for a path; two models of the same name get `-<index>`.
Which step makes a missing store is said here too, once, so every reader refuses it the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from fusemerge.checkpoint.layout import orphan_tmp_siblings, remove_path
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.pairs import PREFERENCE_NAME, SFT_NAME
from fusemerge.fuse.implicit.spec import domain_slug
from fusemerge.fuse.recipe import FuseRecipe, ModelSpec
from fusemerge.fuse.store import MANIFEST, TopKStore

TEACHER_DIR = "teacher"
ALIGNED_DIR = "aligned"
VOCAB_DIR = "vocab"
TRAIN_DIR = "train"
TRAIN_STAMP = "fusemerge_train.json"  # in train/<target>/: checkpoints resume only the run they were made for
FINAL_CHECKPOINT = "final"  # in train/<target>/: the trained weights, saved by the Trainer
MERGE_RECIPE = "merge.yml"
IMPLICIT_DIR = "implicit"
SAMPLES_DIR = "samples"
SCORES_DIR = "scores"
IMPLICIT_TARGETS = {"sft": "implicit-sft", "preference": "implicit"}  # stage -> <pivot>-<suffix>
FINE_TUNE_SUFFIX = "finetune"  # <pivot>-finetune: the plain fine-tune's target
# training keys that change how a run is observed or saved, not what it trains: no part of the train key
OBSERVING = {"save_steps", "logging_steps", "dataloader_workers", "save_dtype", "keep_checkpoints"}


class Target(NamedTuple):
    """One fused target of the plan: its folder name and the indices of the sources it learns from."""

    name: str
    members: list[int]

    @property
    def key(self) -> str:
        """Its key in what `run_fuse` returns."""
        return f"target/{self.name}"


class FuseWorkDir:
    """The paths, names and target plan of one fuse recipe (computed from the recipe, nothing on disk)."""

    def __init__(self, recipe: FuseRecipe) -> None:
        self.recipe = recipe
        self.root = recipe.work_path
        self.output = Path(recipe.output)
        names = [_slug(spec) for _, spec in recipe.models]
        self.names = [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]

    @property
    def pivot_name(self) -> str:
        return self.names[0]

    @property
    def source_names(self) -> list[str]:
        """Every source's folder name, in recipe order (also its name in the training inputs)."""
        return self.names[1:]

    @property
    def teacher_stores(self) -> list[Path]:
        """work_dir/teacher/<name> per model, pivot first."""
        return [self.root / TEACHER_DIR / n for n in self.names]

    @property
    def aligned_stores(self) -> list[Path]:
        """work_dir/aligned/<source name> per source, in recipe order."""
        return [self.root / ALIGNED_DIR / n for n in self.source_names]

    @property
    def mapping_files(self) -> list[Path]:
        """work_dir/vocab/<source name>-to-<pivot name>.safetensors per source, in recipe order."""
        return [self.root / VOCAB_DIR / f"{s}-to-{self.pivot_name}.safetensors" for s in self.source_names]

    @property
    def targets(self) -> list[Target]:
        """The target plan: pairwise = one target per source, `fusion.sources: all` = one for all, and a
        fine-tune one target from no source."""
        if self.recipe.fine_tune:
            return [Target(f"{self.pivot_name}-{FINE_TUNE_SUFFIX}", [])]
        if self.recipe.fusion.sources == "all":
            return [Target(f"{self.pivot_name}-fused", list(range(len(self.source_names))))]
        return [Target(f"{self.pivot_name}-{s}", [i]) for i, s in enumerate(self.source_names)]

    def target_folder(self, target: Target) -> Path:
        """The target's model folder under the recipe's output."""
        return self.output / target.name

    def checkpoints(self, target: Target) -> Path:
        """work_dir/train/<target>-<key>: the Trainer checkpoints the target resumes from."""
        return self.root / TRAIN_DIR / f"{target.name}-{self.train_key(target)}"

    def train_key(self, target: Target) -> str:
        """10 hex digits of sha256 over what the target's training depends on, as the recipe says it.

        The pivot, the data and chat template, the fusion and training settings (less `OBSERVING`) and,
        for a fused target, its sources with their teacher and alignment settings. Recipes that differ in
        any of these train in different folders; the stores' contents are checked by the folder's stamp.
        """
        recipe = self.recipe
        what: dict[str, Any] = {
            "pivot": recipe.pivot.model,
            "dataset": recipe.dataset.model_dump(mode="json") if recipe.dataset is not None else None,
            "chat_template": recipe.chat_template,
            "training": recipe.training.model_dump(mode="json", exclude=OBSERVING),
        }
        if recipe.fusion.kind == "implicit" and recipe.implicit is not None:
            # which targets there are is in the target's name; a domain's data is in its stamp
            what["implicit"] = recipe.implicit.model_dump(mode="json", exclude={"targets", "domains"})
        elif recipe.fine_tune:
            what["fusion"] = {"function": "none"}
        else:
            what["fusion"] = recipe.fusion.model_dump(mode="json", by_alias=True)
            what["sources"] = [
                {"model": recipe.sources[i].model, **recipe.teacher_settings(recipe.sources[i])}
                for i in target.members
            ]
            what["pivot_teacher"] = recipe.teacher_settings(recipe.pivot)
            # workers change how fast, not what: results are byte-identical for any count
            what["alignment"] = recipe.alignment.model_dump(mode="json", exclude={"workers"})
        text = json.dumps(what, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]

    @property
    def merge_recipe(self) -> Path:
        """<output>/merge.yml: the merge of the targets, written after the last one is trained."""
        return self.output / MERGE_RECIPE

    @property
    def merged_folder(self) -> Path:
        """Where the printed `fusemerge merge` command suggests putting that merge."""
        return self.output / f"{self.pivot_name}-varm"

    # -- implicit fusion (fusion.kind: implicit) ------------------------------------------------------------
    @property
    def implicit_dir(self) -> Path:
        """work_dir/implicit: the stage files of sample, score and pairs (the pipeline locks it)."""
        return self.root / IMPLICIT_DIR

    @property
    def answering(self) -> list[tuple[str, ModelSpec]]:
        """(folder name, spec) of every model that answers the prompts: the pivot first when it samples too
        (`implicit.sampling.include_pivot`, WRPO's on-policy responses), then the sources."""
        specs = [spec for _, spec in self.recipe.models]
        pairs = list(zip(self.names, specs, strict=True))
        implicit = self.recipe.implicit
        return pairs if implicit is None or implicit.sampling.include_pivot else pairs[1:]

    def samples_folder(self, name: str) -> Path:
        """work_dir/implicit/samples/<model name>: one model's responses (fusemerge.fuse.implicit.sample)."""
        return self.implicit_dir / SAMPLES_DIR / name

    def scores_folder(self, name: str) -> Path:
        """work_dir/implicit/scores/<model name>: those responses scored (fusemerge.fuse.implicit.score)."""
        return self.implicit_dir / SCORES_DIR / name

    @property
    def sft_pairs(self) -> Path:
        """work_dir/implicit/sft.jsonl: the best response per SFT prompt (the pairs step)."""
        return self.implicit_dir / SFT_NAME

    @property
    def preference_pairs(self) -> Path:
        """work_dir/implicit/preference.jsonl: chosen/rejected per preference prompt (the pairs step)."""
        return self.implicit_dir / PREFERENCE_NAME

    @property
    def implicit_domains(self) -> list[str | None]:
        """What each set of implicit targets learns: [None] (one set, every domain), or each domain of
        `implicit.domains` in recipe order (`implicit.targets: per_domain`)."""
        implicit = self.recipe.implicit
        if implicit is None or implicit.targets == "one":
            return [None]
        return list(implicit.domains)

    def implicit_targets(self, domain: str | None = None) -> dict[str, Target]:
        """stage -> its target, for the recipe's `implicit.stages` in order; the last is the fused model.

        `<pivot>-implicit-sft` and `<pivot>-implicit`; a domain's (per_domain) end in `-<domain>`. Every
        target learns from all the sources (members), so the card and the Hub push name them all.
        """
        stages = self.recipe.implicit.stages if self.recipe.implicit is not None else []
        members = list(range(len(self.source_names)))
        suffix = "" if domain is None else f"-{domain_slug(domain)}"
        return {s: Target(f"{self.pivot_name}-{IMPLICIT_TARGETS[s]}{suffix}", members) for s in stages}

    @property
    def implicit_final_targets(self) -> list[Target]:
        """The last stage's target of each domain (one without per_domain): what is pushed and merged."""
        return [list(self.implicit_targets(d).values())[-1] for d in self.implicit_domains]

    def require_teacher_stores(self) -> None:
        """Refuse to go on without a finished teach step: every model's teacher store must be there."""
        for (_, spec), folder in zip(self.recipe.models, self.teacher_stores, strict=True):
            _require(
                folder, f"no teacher store for {spec.name}; run the teach step first (--steps teach,align)"
            )

    def fusion_stores(self) -> tuple[TopKStore, dict[str, TopKStore]]:
        """The pivot's teacher store and every source's aligned store (by source name), opened.

        Whether the aligned stores fit the pivot store is `fusemerge.fuse.inputs`'s check.
        """
        pivot = self.teacher_stores[0]
        _require(pivot, "no pivot teacher store; run fusemerge fuse with --steps teach")
        sources = {}
        for folder in self.aligned_stores:
            _require(folder, "no aligned store; run fusemerge fuse with --steps align")
            sources[folder.name] = TopKStore.open(folder)
        return TopKStore.open(pivot), sources

    # -- what a rerun must not reuse -------------------------------------------------------------------------
    def stale_teacher_stores(self) -> list[tuple[str, Path]]:
        """(model, store) for every teacher store made from other weights than the model's now.

        The store records its model's content fingerprint (`fusemerge.fuse.teacher.model_fingerprint`);
        a model overwritten in place (same path, same shapes) no longer matches it.
        """
        from fusemerge.fuse.teacher import model_fingerprint

        stale = []
        for (_, spec), folder in zip(self.recipe.models, self.teacher_stores, strict=True):
            recorded = _recorded_fingerprint(folder)
            if recorded is not None and recorded != model_fingerprint(spec.model):
                stale.append((spec.model, folder))
        return stale

    def drop_stale_stores(self, *, rebuild: bool, echo: Callable[[str], Any] = print) -> None:
        """Teacher stores of changed models, and the aligned stores made from them, are removed so that
        the teach and align steps make them again (`rebuild`: the teach step runs); without the teach
        step that is an error: training would read them."""
        stale = self.stale_teacher_stores()
        if not stale:
            return
        if not rebuild:
            model, folder = stale[0]
            raise FusemergeError(
                f"the weights of {model} changed since its teacher store was made: rerun the teach and "
                "align steps (--steps teach,align,train), which make it again",
                file=folder,
            )
        for model, folder in stale:
            i = self.teacher_stores.index(folder)
            derived = self.aligned_stores if i == 0 else [self.aligned_stores[i - 1]]
            echo(
                f"teach {folder.name}: the weights of {model} changed since its store was made; it and the "
                "aligned store(s) made from it are made again"
            )
            for path in [folder, *derived]:
                remove_path(path)

    def remove_orphans(self, echo: Callable[[str], Any] = print) -> None:
        """Delete the temporary folders and files that killed runs left (their writer's PID is dead)
        in the output and anywhere in the work dir's step folders; one line when there were any."""
        folders = [self.output, self.root]
        for step in (TEACHER_DIR, ALIGNED_DIR, VOCAB_DIR, TRAIN_DIR):
            folders += [self.root / step, *_subfolders(self.root / step)]
        orphans = [p for folder in folders for p in orphan_tmp_siblings(folder)]
        for path in orphans:
            remove_path(path)
        if orphans:
            echo(
                f"removed {len(orphans)} temporary file(s) left by killed runs: {', '.join(map(str, orphans))}"
            )


def _recorded_fingerprint(store: Path) -> str | None:
    """The model fingerprint a teacher store's manifest records (None: no store, or none recorded)."""
    try:
        identity = json.loads((store / MANIFEST).read_text(encoding="utf-8")).get("identity", {})
    except (OSError, ValueError, AttributeError):
        return None
    fingerprint = identity.get("model_fingerprint") if isinstance(identity, dict) else None
    return fingerprint if isinstance(fingerprint, str) else None


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []


def target_plan(recipe: FuseRecipe) -> list[Target]:
    """`FuseWorkDir(recipe).targets`: (target folder name, indices of its sources) per target."""
    return FuseWorkDir(recipe).targets


def _require(folder: Path, message: str) -> None:
    if not (folder / MANIFEST).is_file():
        raise FusemergeError(message, file=folder)


def _slug(spec: ModelSpec) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.name).strip("-") or "model"


def disk_line(layouts: list[FuseWorkDir], targets: list[Path]) -> str:
    """`disk: ...`: what a run (a recipe, or a recipe and its baseline) holds on disk now, and where."""
    outputs = sorted({str(layout.output) for layout in layouts})
    parts = [
        f"{_size(sum(_bytes(t) for t in targets))} in {len(targets)} target(s) under {', '.join(outputs)}"
    ]
    fused = [layout for layout in layouts if not layout.recipe.fine_tune]
    if fused:
        layout = fused[0]
        stores = [*layout.teacher_stores, *layout.aligned_stores, *layout.mapping_files]
        parts.append(f"{_size(sum(_bytes(p) for p in stores))} of top-K stores under {layout.root}")
    kept = [
        layout.checkpoints(t) for layout in layouts for t in layout.targets if layout.checkpoints(t).exists()
    ]
    if kept:
        where = kept[0] if len(kept) == 1 else kept[0].parent
        parts.append(f"{_size(sum(_bytes(p) for p in kept))} of checkpoints under {where}")
    else:
        parts.append("no checkpoints (training.keep_checkpoints: true keeps them)")
    return "disk: " + "; ".join(parts)


def _bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when missing)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def write_merge_recipe(recipe: FuseRecipe, targets: list[Path]) -> Path:
    """<output>/merge.yml: FuseChat's merge (VaRM) of the targets with the pivot as base (a mergekit recipe).

    The one writer of it, for explicit fusion's targets (one per source) and implicit fusion's (one per
    domain, `implicit.targets: per_domain`).
    """
    import yaml

    from fusemerge.checkpoint.layout import atomic_write_text

    body: dict[str, Any] = {
        "merge_method": "variation_ratio",
        "base_model": recipe.pivot.model,
        "models": [{"model": str(t)} for t in targets],
    }
    header = "# Written by `fusemerge fuse`: merge the fused targets (FuseChat's VaRM, the pivot as base).\n"
    pivot_dtype = _saved_dtype(Path(recipe.pivot.model))  # None for a Hub id: then say float32 anyway
    if pivot_dtype != "float32" and any(_saved_dtype(t) == "float32" for t in targets):
        # unset, the merge is written in the base's dtype: rounding it there would erase the targets' change
        body["out_dtype"] = "float32"
        header += "# out_dtype float32: the targets were saved in float32 (training.save_dtype).\n"
    path = FuseWorkDir(recipe).merge_recipe
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, header + yaml.safe_dump(body, sort_keys=False))
    return path


def _saved_dtype(target: Path) -> str | None:
    """The dtype a target folder's config.json names (transformers writes `dtype`; older: `torch_dtype`)."""
    try:
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return config.get("dtype") or config.get("torch_dtype")
