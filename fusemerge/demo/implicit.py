"""`fusemerge demo --implicit`: implicit fusion (FuseChat-3.0) end to end, offline, on small models trained
on the spot.

    fusemerge demo --implicit --out demo-out

1. Data (fusemerge.demo.arithmetic): the addition and multiplication tables (1 to 9) as prompts with gold
   answers; the pipeline asks each fact in two wordings, the evaluation in the third; every answer
   restates the fact ("7 * 8 = 56"), so that a fact learnt in one wording is known in the others.
2. Models (fusemerge.demo.pretrain), each with its own vocabulary and architecture (Qwen3's BPE cut to
   4k ids with Llama; to 1k ids with Qwen2; to 2k ids with Mistral): a pivot
   pre-trained on a quarter of each table, an addition specialist and a multiplication specialist each
   pre-trained on the whole of its own table only.
3. The implicit pipeline, step by step with the library's own functions (fusemerge.fuse.implicit):
   `sample` (the sources and the pivot answer every prompt several times), `score` (`math_answer`
   against the gold answers), `pairs` (the best correct source answer per SFT prompt; a correct and a
   wrong answer of one source per preference prompt; the pivot's own best correct answer for WRPO), `sft` (the
   pivot on the SFT set), `preference` (the SFT target on the pairs, once per loss: DPO and WRPO).
4. Held-out accuracy (greedy answers, scored by `math_answer`) for the pivot, each source, the SFT-only
   target and each SFT + preference target: one table, results.json and a PNG, and the claims.

The orchestration is deliberately thin: the recipe it runs is written to `implicit-<loss>.yml` in the
form of a `fusemerge fuse` recipe with `fusion: {kind: implicit}`, and each step is one library call, so
that the demo can switch to `run_fuse` on that recipe once the recipe path supports implicit fusion.
Every step reuses its finished output on a rerun (the library's manifests and stamps decide), and every
seed is fixed, so a rerun on the same machine prints the same table.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusemerge.checkpoint.layout import atomic_write_text, exclusive_lock
from fusemerge.demo.arithmetic import DOMAINS, ArithmeticPlan, build_arithmetic
from fusemerge.demo.pretrain import ModelPlan, pretrain_demo_models
from fusemerge.demo.results import PIVOT_LABEL, SFT_LABEL, ImplicitResult, preference_label
from fusemerge.fuse.implicit.spec import ImplicitSpec, SamplingSpec, ScoringSpec
from fusemerge.fuse.recipe import ModelSpec, TrainingSpec

PIVOT = "pivot"  # the pivot's folder name under samples/


def source_label(domain: str) -> str:
    return f"{domain} specialist (source)"


@dataclass(frozen=True)
class ImplicitDemoPlan:
    """Everything the demo's numbers depend on; the defaults are the demo."""

    data: ArithmeticPlan = ArithmeticPlan()
    # Three vocabularies (Qwen3's BPE cut to 4k, 1k and 2k ids: a tiny model's cost is its output layer)
    # and three architectures. Not GPT-2's BPE: it glues the space to the digit ("Assistant:", " 28"),
    # so after the chat template's generation prompt, which ends in a lone space, a GPT-2 model starts
    # from a token it never saw before a number (a GPT-2 pivot answered "* 4" to "What is 1 + 1?").
    # Small batches and many steps: what a tiny model learns most from in a fixed time.
    pivot: ModelPlan = ModelPlan("pivot", "qwen3-4k", "llama", epochs=30, batch_size=8, seed=1)
    sources: tuple[tuple[str, ModelPlan], ...] = (
        ("addition", ModelPlan("addition-specialist", "qwen3-1k", "qwen2", epochs=30, batch_size=8, seed=2)),
        (
            "multiplication",
            ModelPlan("multiplication-specialist", "qwen3-2k", "mistral", epochs=30, batch_size=8, seed=3),
        ),
    )
    # The recipe's `implicit` section (fusemerge.fuse.implicit.spec), less the preference loss.
    implicit: dict[str, Any] = field(
        default_factory=lambda: {
            "sampling": {
                "samples": 8,
                "max_new_tokens": 12,  # "7 * 8 = 56" and the stop: 9 to 10 tokens
                "temperature": 0.8,
                "top_p": 0.95,
                "batch_size": 64,
                "seed": 42,
            },
            "scoring": {"default": "math_answer"},
            "pairs": {"sft_fraction": 0.4, "seed": 42},
            # FuseChat-3.0's proportions: the preference stage at a tenth of the SFT learning rate (its
            # is 5-15x lower) and a third of its epochs (1 against 3). At 5e-4 for 10 epochs, above the SFT
            # rate, DPO erased more than it taught (bare answers: the pivot's facts 92.5% -> 72.5% held-out).
            "preference": {
                "beta": 0.1,
                "alpha": 0.5,
                "learning_rate": 1.0e-4,
                "epochs": 3,
                "batch_size": 8,
                "gradient_accumulation": 1,
                "max_length": 64,
            },
        }
    )
    losses: tuple[str, ...] = ("dpo", "wrpo")
    # The SFT stage (`training`): full fine-tuning, float32 (the CPU's precision), the pipeline's schedule.
    # A schedule that learns its own data: at lr 3e-4 for 5 epochs the SFT target answered 17% of its new
    # SFT facts in the very prompts it trained on, at 1e-3 for 10 epochs 81%.
    training: dict[str, Any] = field(
        default_factory=lambda: {
            "mode": "full",
            "learning_rate": 1.0e-3,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.03,
            "epochs": 10,
            "batch_size": 8,
            "gradient_accumulation": 1,
            "dtype": "float32",
            "save_steps": 100000,
            "logging_steps": 25,
            "group_by_length": False,
            "seed": 42,
        }
    )
    sft_max_length: int = 64
    # Held-out evaluation: one greedy answer per problem, as long as the sampled ones.
    eval_batch_size: int = 64
    # Torch threads while the demo runs. A model this small gives each matrix product too little work to
    # share: on a busy 2-core machine a training step took 0.09 s on one thread and 1.5 s on two (the
    # threads wait for each other), so one thread is what makes minutes of CPU enough. None: torch's own.
    threads: int | None = 1


@dataclass(frozen=True)
class DemoRecipe:
    """An implicit fuse recipe as the training half reads it (`fusemerge.fuse.implicit.target.ImplicitRecipe`)."""

    pivot: ModelSpec
    sources: list[ModelSpec]
    training: TrainingSpec
    implicit: ImplicitSpec
    chat_template: str
    raw_yaml: str


def run_implicit_demo(
    out: str | Path,
    plan: ImplicitDemoPlan = ImplicitDemoPlan(),
    *,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> ImplicitResult:
    """Run every stage (finished stages are reused on a rerun); print and save the results table.

    Args:
        out: the demo's folder (data, models, work dir, targets, results).
        plan: sizes, schedules and seeds.
        progress: progress bars.
        echo: where the status lines, the table and the claims go.
    """
    import torch

    before = torch.get_num_threads()
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    try:
        return _run(Path(out), plan, progress=progress, echo=echo)
    finally:
        torch.set_num_threads(before)


def _run(out: Path, plan: ImplicitDemoPlan, *, progress: bool, echo: Callable[[str], Any]) -> ImplicitResult:
    from fusemerge.demo.report import implicit_check_lines, implicit_table, save_implicit_plot

    start = time.monotonic()
    echo(f"[1/5] data: the addition and multiplication tables, each fact in three wordings -> {out / 'data'}")
    data = build_arithmetic(out / "data", plan.data)

    echo("[2/5] models: a weak pivot and one specialist per operation, each with its own tokenizer")
    pivot, sources = pretrain_demo_models(
        out / "models", plan.pivot, plan.sources, data, progress=progress, echo=echo
    )

    recipes = {loss: _recipe(out, plan, pivot, sources, data.fusion_file, loss) for loss in plan.losses}
    work = out / "implicit-work"
    work.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(work, what="implicit demo"):
        echo("[3/5] sample, score, pairs: every model answers every prompt; math_answer; SFT set and pairs")
        stats = _data_steps(work, recipes[plan.losses[0]], data.fusion_file, progress=progress, echo=echo)
        echo("[4/5] sft, then preference on the SFT target (one target per loss)")
        targets = _train(out, work, recipes, progress=progress, echo=echo)

    echo("[5/5] eval: held-out accuracy, one greedy answer per problem, scored by math_answer")
    folders: dict[str, Path] = {PIVOT_LABEL: pivot}
    folders.update({source_label(d): p for d, p in sources.items()})
    folders.update(targets)
    accuracy = _evaluate(out / "eval", folders, data.heldout_file, plan, progress=progress, echo=echo)
    result = ImplicitResult(accuracy, folders, pipeline=stats, seconds=time.monotonic() - start)

    atomic_write_text(out / "results.json", result.to_json())
    plot = save_implicit_plot(result, out / "results.png")
    echo("")
    echo(implicit_table(result))
    echo("")
    for line in implicit_check_lines(result, list(plan.losses)):
        echo(line)
    echo(f"results: {out / 'results.json'}, plot: {plot}  ({result.seconds / 60:.1f} min)")
    return result


def _recipe(
    out: Path, plan: ImplicitDemoPlan, pivot: Path, sources: dict[str, Path], prompts: Path, loss: str
) -> DemoRecipe:
    """The recipe of one preference loss, saved as `implicit-<loss>.yml` (a `fuse` recipe in form)."""
    implicit = dict(plan.implicit, preference={**plan.implicit["preference"], "loss": loss})
    raw = {
        "fusion": {"kind": "implicit"},
        "pivot": str(pivot),
        "sources": [str(p) for p in sources.values()],
        "dataset": {"path": str(prompts)},
        "chat_template": "pivot",
        "implicit": implicit,
        "training": plan.training,
        "output": str(out / "targets"),
        "work_dir": str(out / "implicit-work"),
    }
    text = yaml.safe_dump(raw, sort_keys=False)
    atomic_write_text(out / f"implicit-{loss}.yml", text)
    return DemoRecipe(
        pivot=ModelSpec(model=str(pivot)),
        sources=[ModelSpec(model=str(p)) for p in sources.values()],
        training=TrainingSpec(**plan.training),
        implicit=ImplicitSpec(**implicit),
        chat_template="pivot",
        raw_yaml=text,
    )


def _answerers(recipe: DemoRecipe) -> dict[str, str]:
    """Every model that answers the prompts, by its folder name under samples/: the sources, then the pivot."""
    named = {Path(s.model).name: s.model for s in recipe.sources}
    named[PIVOT] = recipe.pivot.model
    return named


def _data_steps(
    work: Path, recipe: DemoRecipe, prompts_file: Path, *, progress: bool, echo: Callable[[str], Any]
) -> dict[str, Any]:
    """sample -> score -> pairs under `work/implicit/`; returns what they made, for the results."""
    from fusemerge.fuse.implicit.pairs import run_pairs
    from fusemerge.fuse.implicit.prompts import read_prompts
    from fusemerge.fuse.implicit.sample import SampleModel, run_sample
    from fusemerge.fuse.implicit.score import run_score
    from fusemerge.fuse.implicit.scorers import ScorerContext

    spec = recipe.implicit
    stage = work / "implicit"
    prompts = read_prompts(path=str(prompts_file))
    context = ScorerContext(spec.scoring, progress=progress)
    scores: dict[str, Path] = {}
    for name, model in _answerers(recipe).items():
        samples = stage / "samples" / name
        run_sample(
            model=SampleModel(name=name, model=model),
            prompts=prompts,
            spec=spec.sampling,
            folder=samples,
            progress=progress,
            echo=echo,
        )
        scores[name] = stage / "scores" / name
        run_score(
            name=name,
            samples=samples,
            folder=scores[name],
            prompts=prompts,
            spec=spec.scoring,
            context=context,
            progress=progress,
            echo=echo,
        )
    run_pairs(scores=scores, pivot=PIVOT, folder=stage, spec=spec.pairs, progress=progress, echo=echo)
    return _pipeline_stats(stage, scores)


def _pipeline_stats(stage: Path, scores: dict[str, Path]) -> dict[str, Any]:
    """How often each model's samples were right, and the SFT and preference set sizes (from the files)."""
    import json

    from fusemerge.checkpoint.layout import STATE_DIR
    from fusemerge.fuse.implicit.pairs import MANIFEST_NAME
    from fusemerge.fuse.implicit.sample import stage_lines

    sampled: dict[str, dict[str, float]] = {}
    for name, folder in scores.items():
        right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for line in stage_lines(folder):
            right[line["domain"]][0] += bool(line["passed"])
            right[line["domain"]][1] += 1
        sampled[name] = {d: round(r / n, 4) for d, (r, n) in sorted(right.items())}
    manifest = json.loads((stage / STATE_DIR / MANIFEST_NAME).read_text(encoding="utf-8"))
    return {"sample_accuracy": sampled, "pairs": manifest["stats"]}


def _train(
    out: Path, work: Path, recipes: dict[str, DemoRecipe], *, progress: bool, echo: Callable[[str], Any]
) -> dict[str, Path]:
    """The SFT target, then one SFT + preference target per loss; by table label."""
    from fusemerge.fuse.implicit.datasets import read_preference_data, read_sft_data
    from fusemerge.fuse.implicit.pairs import PREFERENCE_NAME, SFT_NAME
    from fusemerge.fuse.implicit.preference import run_preference
    from fusemerge.fuse.implicit.sft import run_sft
    from fusemerge.fuse.implicit.spec import DataFileSpec

    stage = work / "implicit"
    first = next(iter(recipes.values()))
    sft_data, pref_data = stage / SFT_NAME, stage / PREFERENCE_NAME
    sft = run_sft(
        recipe=first,
        records=read_sft_data(spec=DataFileSpec(path=str(sft_data))),
        out=out / "targets" / "sft",
        checkpoints=work / "train" / "sft",
        max_length=_sft_max_length(first),
        data_names=[str(sft_data)],
        progress=progress,
        echo=echo,
    )
    targets = {SFT_LABEL: sft}
    pairs = read_preference_data(spec=DataFileSpec(path=str(pref_data)))
    for loss, recipe in recipes.items():
        targets[preference_label(loss)] = run_preference(
            recipe=recipe,
            pairs=pairs,
            out=out / "targets" / f"sft-{loss}",
            checkpoints=work / "train" / loss,
            policy=sft,
            data_names=[str(sft_data), str(pref_data)],
            progress=progress,
            echo=echo,
        )
    return targets


def _sft_max_length(recipe: DemoRecipe) -> int:
    """The SFT sequences' token limit: the preference stage's, so both stages see the same conversations."""
    return recipe.implicit.preference.max_length


def _evaluate(
    folder: Path,
    models: dict[str, Path],
    heldout: Path,
    plan: ImplicitDemoPlan,
    *,
    progress: bool,
    echo: Callable[[str], Any],
) -> dict[str, dict[str, float]]:
    """Held-out accuracy per domain (and their mean) of every model: the pipeline's own sample and score
    steps, greedy and one answer per problem, so the evaluation is the same code as the data it trained on."""
    from fusemerge.fuse.implicit.prompts import read_prompts
    from fusemerge.fuse.implicit.sample import SampleModel, run_sample, stage_lines
    from fusemerge.fuse.implicit.score import run_score
    from fusemerge.fuse.implicit.scorers import ScorerContext

    sampling = SamplingSpec(
        samples=1,
        temperature=0.0,
        max_new_tokens=plan.implicit["sampling"]["max_new_tokens"],
        batch_size=plan.eval_batch_size,
        shard_size=100_000,
    )
    scoring = ScoringSpec(default="math_answer")
    prompts = read_prompts(path=str(heldout))
    context = ScorerContext(scoring, progress=progress)
    table: dict[str, dict[str, float]] = {}
    for i, (label, model) in enumerate(models.items()):
        name = f"{i:02d}-{model.name}-{_made_from(model)}"
        samples, scores = folder / "samples" / name, folder / "scores" / name
        run_sample(
            model=SampleModel(name=label, model=str(model)),
            prompts=prompts,
            spec=sampling,
            folder=samples,
            progress=progress,
            echo=echo,
            rebuild=True,
        )
        run_score(
            name=label,
            samples=samples,
            folder=scores,
            prompts=prompts,
            spec=scoring,
            context=context,
            progress=progress,
            echo=echo,
            rebuild=True,
        )
        right: dict[str, list[int]] = {d: [0, 0] for d in DOMAINS}
        for line in stage_lines(scores):
            right[line["domain"]][0] += bool(line["passed"])
            right[line["domain"]][1] += 1
        row = {d: r / n if n else 0.0 for d, (r, n) in right.items()}
        row["average"] = sum(row.values()) / len(DOMAINS)
        table[label] = row
    return table


def _made_from(model: Path) -> str:
    """12 hex digits of the model's stamp (what it was trained from), for its evaluation folder's name.

    The sample manifest's model fingerprint does not see retrained weights of the same shapes and sizes,
    so a target retrained with other settings would otherwise be "evaluated" by its predecessor's answers.
    """
    import hashlib

    from fusemerge.checkpoint.layout import TARGET_STAMP
    from fusemerge.demo.pretrain import STAMP

    for stamp in (TARGET_STAMP, STAMP):
        if (model / stamp).is_file():
            return hashlib.sha256((model / stamp).read_bytes()).hexdigest()[:12]
    return "unstamped"
