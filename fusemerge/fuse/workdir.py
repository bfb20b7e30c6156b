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
    train/<target>/                          Trainer checkpoints of each target (fusemerge.fuse.train), with
                                             fusemerge_train.json (what they were made for) and final/ (the
                                             trained weights before they are folded into the target folder)

    implicit/                                implicit fusion (fusion.kind: implicit; fusemerge.fuse.implicit):
      samples/<model>/, scores/<model>/      every answering model's responses, then their scores
      sft.jsonl, preference.jsonl            the pairs step's SFT examples and preference pairs

and under the recipe's output:

    <pivot>-<source>/      one fused target per source (pairwise fusion, the paper), a model folder
    <pivot>-fused/         or one target from all sources at once (`fusion.sources: all`, FuseLLM)
    merge.yml              the next stage: `variation_ratio` over the targets with the pivot as base
    <pivot>-implicit-sft/  implicit fusion: the SFT target (the pivot trained on the best answers)
    <pivot>-implicit/      ... and the preference target trained from it (the final model)

Why one object: the teach, align and train steps, the training inputs, the Hub push and the demo all
name these folders; each used to rebuild them (and the target names) on its own. A model's folder name
is its recipe name (`ModelSpec.name`) made safe for a path; two models of the same name get `-<index>`.
Which step makes a missing store is said here too, once, so every reader refuses it the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.pairs import PREFERENCE_NAME, SFT_NAME
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
        """The target plan: pairwise = one target per source, `fusion.sources: all` = one for all."""
        if self.recipe.fusion.sources == "all":
            return [Target(f"{self.pivot_name}-fused", list(range(len(self.source_names))))]
        return [Target(f"{self.pivot_name}-{s}", [i]) for i, s in enumerate(self.source_names)]

    def target_folder(self, target: Target) -> Path:
        """The target's model folder under the recipe's output."""
        return self.output / target.name

    def checkpoints(self, target: Target) -> Path:
        """work_dir/train/<target>: the Trainer checkpoints the target resumes from."""
        return self.root / TRAIN_DIR / target.name

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
    def implicit_targets(self) -> dict[str, Target]:
        """stage -> its target, for the recipe's `implicit.stages` in order; the last is the fused model.

        Every target learns from all the sources (members), so the card and the Hub push name them all.
        """
        stages = self.recipe.implicit.stages if self.recipe.implicit is not None else []
        members = list(range(len(self.source_names)))
        return {s: Target(f"{self.pivot_name}-{IMPLICIT_TARGETS[s]}", members) for s in stages}

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


def target_plan(recipe: FuseRecipe) -> list[Target]:
    """`FuseWorkDir(recipe).targets`: (target folder name, indices of its sources) per target."""
    return FuseWorkDir(recipe).targets


def _require(folder: Path, message: str) -> None:
    if not (folder / MANIFEST).is_file():
        raise FusemergeError(message, file=folder)


def _slug(spec: ModelSpec) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.name).strip("-") or "model"
