"""`fusemerge demo`: FuseChat end to end, offline, on small models trained on the spot.

    fusemerge demo --out demo-out

1. Data (fusemerge.demo.corpus): two real domains, Python standard library code and chatterbot English
   conversations, split into disjoint parts for pre-training, fusion and evaluation.
2. Models (fusemerge.demo.pretrain), each with its own real tokenizer and architecture:
   a pivot (Mistral SentencePiece, Llama) pre-trained lightly on a little of both domains, a code
   specialist (Qwen3 byte-level BPE, Qwen2) and a chat specialist (GPT-2 BPE, Mistral) pre-trained on
   several times more of their own domain.
3. `fuse` (the real pipeline: teacher top-K pass, token alignment, vocabulary mapping, MinCE, training):
   one target per specialist (pairwise, the paper) at the recommended setting (`RECOMMENDED`, the best
   that bench/fusion_ablation.py measured on this data), the paper's baseline with the same data and
   schedule but the CLM loss alone (`fuse --baseline`: the recipe with `fusion.function: none`), and one
   target per specialist at the paper's setting (`PAPER`), a row of its own beside the recommended one.
4. `merge` of the two (recommended) targets with `variation_ratio` (VaRM, the pivot as base) and with `linear`.
5. `eval`: held-out bits per byte per domain for every model, printed as one table, saved as JSON and
   drawn as a PNG.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusemerge.checkpoint.layout import atomic_write_text
from fusemerge.demo.corpus import DOMAINS, CorpusPlan, build_corpus
from fusemerge.demo.pretrain import ModelPlan, pretrain_demo_models
from fusemerge.demo.results import PAPER_SUFFIX, DemoResult

# The paper's setting (FuseChat: token alignment by edit distance, the statistics vocabulary mapping, MinCE
# per token, lambda 0.9, T = 1) and the one this demo recommends, the best measured by
# bench/fusion_ablation.py on the demo's data (its table is in the README). Gains over CLM-only, mean of
# seeds 42, 1, 2 (spread about 0.02-0.05): paper +0.02% code, -0.39% chat; offsets + prefix with MinCE
# per token -0.17% / -0.53%; offsets + prefix with MinCE per byte -0.27% / -0.32% (exact spans) and
# -0.29% / -0.33% (chain spans, better in all six seed pairs), the largest margin on the weaker domain,
# hence recommended. Lambda 0.7 and 0.5, T = 2 and mince_token were no better.
PAPER: dict[str, dict[str, Any]] = {
    # spans pinned: fusemerge's default (chain) covers positions the paper's rule leaves one-hot
    "alignment": {"tokens": "dtw", "vocab": "stats", "spans": "exact"},
    "fusion": {"metric": "ce_per_token", "lambda": 0.9, "temperature": 1.0},
}
RECOMMENDED: dict[str, dict[str, Any]] = {
    "alignment": {"tokens": "offsets", "vocab": "prefix", "spans": "chain"},
    "fusion": {"metric": "ce_per_byte", "lambda": 0.9, "temperature": 1.0},
}


def describe(setting: dict[str, dict[str, Any]]) -> str:
    """`offsets + prefix, MinCE ce_per_byte, lambda 0.5, T 1`: a setting in one line."""
    a, f = setting["alignment"], setting["fusion"]
    spans = f", {a['spans']} spans" if "spans" in a else ""
    return f"{a['tokens']} + {a['vocab']}{spans}, MinCE {f['metric']}, lambda {f['lambda']}, T {f['temperature']:g}"


@dataclass(frozen=True)
class DemoPlan:
    """Everything the demo's numbers depend on; the defaults are the demo."""

    corpus: CorpusPlan = CorpusPlan()
    # Small batches and many steps: what a tiny model learns most from in a fixed time on a CPU.
    pivot: ModelPlan = ModelPlan("pivot", "mistral", "llama", epochs=4, batch_size=2, seed=1)
    specialists: tuple[tuple[str, ModelPlan], ...] = (
        ("code", ModelPlan("code-specialist", "qwen3-32k", "qwen2", epochs=3, batch_size=2, seed=2)),
        ("chat", ModelPlan("chat-specialist", "gpt2", "mistral", epochs=5, batch_size=2, seed=3)),
    )
    # The fusion stage at the recommended setting (the best of bench/fusion_ablation.py on this data);
    # a schedule sized for small models. `paper` is what the paper's setting changes in it: its targets
    # are a row of their own, trained with the same schedule, seed and teacher stores.
    fuse: dict[str, Any] = field(
        default_factory=lambda: {
            "chat_template": "pivot",
            "teacher": {"top_k": 10, "batch_size": 16, "dtype": "float32", "shard_size": 256},
            "alignment": dict(RECOMMENDED["alignment"]),
            "fusion": {"function": "mince", "sources": "pairwise", "loss": "ce", **RECOMMENDED["fusion"]},
            "training": {
                "mode": "full",
                "learning_rate": 1.0e-3,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.03,
                "weight_decay": 0.0,
                "epochs": 3,
                "batch_size": 4,
                "gradient_accumulation": 2,
                "dtype": "float32",
                "save_steps": 100000,
                "logging_steps": 25,
                "seed": 42,
            },
        }
    )
    paper: dict[str, dict[str, Any]] = field(default_factory=lambda: json.loads(json.dumps(PAPER)))
    recommended: str = "the best setting of bench/fusion_ablation.py"  # where `fuse`'s setting comes from


def run_fusion_demo(
    out: str | Path,
    plan: DemoPlan = DemoPlan(),
    *,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> DemoResult:
    """Run every stage (finished stages are reused on a rerun); print and save the results table."""
    from fusemerge.demo.report import check_lines, results_table, save_plot

    start = time.monotonic()
    out = Path(out)
    echo(f"[1/5] data: Python standard library code and chatterbot English conversations -> {out / 'data'}")
    corpus = build_corpus(out / "data", plan.corpus)

    echo("[2/5] models: a pivot and one specialist per domain, each with its own tokenizer")
    pivot, specialists = pretrain_demo_models(
        out / "models", plan.pivot, plan.specialists, corpus, progress=progress, echo=echo
    )

    echo("[3/5] fuse: teacher pass, alignment, MinCE training (one target per specialist), CLM-only baseline")
    echo(f"      recommended setting ({plan.recommended}): {describe(_setting(plan.fuse))}")
    echo(f"      paper's setting, trained beside it: {describe(_setting(_with(plan.fuse, plan.paper)))}")
    targets, paper_targets, baseline, varm_recipe = _fuse(
        out, plan, pivot, specialists, corpus.fusion_file, progress=progress, echo=echo
    )

    echo("[4/5] merge: the fused targets with variation_ratio (VaRM, the recipe fuse wrote) and linear")
    merged = _merge(out, varm_recipe, list(targets.values()), progress=progress, echo=echo)

    echo("[5/5] eval: held-out bits per byte on assistant text, per domain")
    folders: dict[str, Path] = {"pivot": pivot}
    folders.update({f"{d} specialist (teacher)": p for d, p in specialists.items()})
    folders["pivot + CLM only (baseline)"] = baseline
    folders.update({f"fused with {d} specialist": p for d, p in targets.items()})
    folders.update({f"fused with {d} specialist{PAPER_SUFFIX}": p for d, p in paper_targets.items()})
    folders["VaRM merge"] = merged["variation_ratio"]
    folders["linear merge"] = merged["linear"]
    result = _evaluate(folders, corpus.heldout_file, progress=progress)
    result.varm_weights = varm_weights(pivot, list(targets.values()))
    result.seconds = time.monotonic() - start

    atomic_write_text(out / "results.json", result.to_json())
    plot = save_plot(result, out / "results.png")
    echo("")
    echo(results_table(result))
    echo("")
    for line in check_lines(result, [d for d, _ in plan.specialists]):
        echo(line)
    echo(f"results: {out / 'results.json'}, plot: {plot}  ({result.seconds / 60:.1f} min)")
    return result


def _fuse(
    out: Path,
    plan: DemoPlan,
    pivot: Path,
    specialists: dict[str, Path],
    fusion_file: Path,
    *,
    progress: bool,
    echo: Callable[[str], Any],
) -> tuple[dict[str, Path], dict[str, Path], Path, Path]:
    """The FuseChat recipe at the recommended setting, run with its CLM-only baseline (`--baseline`: same
    data, schedule and seed), then at the paper's setting: (targets, the paper's targets, baseline, the
    recommended targets' merge recipe)."""
    from fusemerge.fuse.pipeline import run_fuse
    from fusemerge.fuse.recipe import load_fuse_recipe
    from fusemerge.fuse.workdir import TEACHER_DIR, FuseWorkDir

    work = out / "fuse-work"
    common = {
        "pivot": str(pivot),
        "sources": [str(p) for p in specialists.values()],
        "dataset": {"path": str(fusion_file), "format": "openai", "max_length": 512},
        **plan.fuse,
        "work_dir": str(work),
    }
    fuse_recipe = _write_recipe(out / "fuse.yml", {**common, "output": str(out / "fused")})
    made = run_fuse(fuse_recipe, progress=progress, echo=echo, baseline=True)
    recipe = load_fuse_recipe(fuse_recipe)
    layout = FuseWorkDir(recipe).targets  # pairwise: one per source, in order
    targets = {domain: made[t.key] for domain, t in zip(specialists, layout, strict=True)}
    clm_only = made[FuseWorkDir(recipe.baseline()).targets[0].key]

    # The paper's setting: the same teacher stores; its own aligned stores when its alignment differs
    paper = _with(plan.fuse, plan.paper)
    paper_work = work if paper["alignment"] == plan.fuse["alignment"] else out / "fuse-work-paper"
    if paper_work != work:
        paper_work.mkdir(parents=True, exist_ok=True)
        link = paper_work / TEACHER_DIR
        if not link.exists():
            link.symlink_to((work / TEACHER_DIR).resolve(), target_is_directory=True)
    paper_recipe = _write_recipe(
        out / "fuse-paper.yml",
        {**common, **paper, "work_dir": str(paper_work), "output": str(out / "fused-paper")},
    )
    made = run_fuse(paper_recipe, progress=progress, echo=echo)
    layout = FuseWorkDir(load_fuse_recipe(paper_recipe)).targets
    paper_targets = {domain: made[t.key] for domain, t in zip(specialists, layout, strict=True)}
    return targets, paper_targets, clm_only, made_merge(recipe)


def made_merge(recipe: Any) -> Path:
    """The VaRM recipe `fuse` wrote over the recommended targets."""
    from fusemerge.fuse.workdir import FuseWorkDir

    return FuseWorkDir(recipe).merge_recipe


def _setting(fuse: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"alignment": fuse["alignment"], "fusion": fuse["fusion"]}


def _with(fuse: dict[str, Any], change: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fuse sections with `change` laid over them, section by section."""
    return {k: {**v, **change.get(k, {})} if isinstance(v, dict) else v for k, v in fuse.items()}


def _merge(
    out: Path, varm_recipe: Path, targets: list[Path], *, progress: bool, echo: Callable[[str], Any]
) -> dict[str, Path]:
    """VaRM with the recipe `fuse` wrote (the pivot as base); linear: the plain average of the targets."""
    from fusemerge.merge.api import run_merge

    linear = {
        "merge_method": "linear",
        "models": [{"model": str(t), "parameters": {"weight": 1.0}} for t in targets],
    }
    recipes = {"variation_ratio": varm_recipe, "linear": _write_recipe(out / "merge-linear.yml", linear)}
    return {
        method: run_merge(recipe, out / f"merged-{method}", overwrite=True, progress=progress, echo=echo)
        for method, recipe in recipes.items()
    }


def _evaluate(folders: dict[str, Path], heldout: Path, *, progress: bool) -> DemoResult:
    from fusemerge.evaluate import evaluate_models

    # float32 everywhere: bfloat16 (the GPU default) would move the small differences the table is about.
    report = evaluate_models(list(folders.values()), [heldout], dtype="float32", progress=progress)
    table: dict[str, dict[str, float]] = {}
    for label, folder in folders.items():
        row = {d: report.score(str(folder), d).bits_per_byte for d in DOMAINS}
        row["average"] = sum(row[d] for d in DOMAINS) / len(DOMAINS)
        table[label] = row
    return DemoResult(table, folders)


def varm_weights(pivot: Path, targets: list[Path]) -> list[float]:
    """VaRM's weight of the first target in every matrix, as `variation_ratio` computes it.

    Shown because it explains the VaRM-vs-linear row: where the targets moved each matrix by similar
    amounts, every W is near 1/n and VaRM is the average.
    """
    from fusemerge.checkpoint.reader import ModelFolder
    from fusemerge.merge.methods.variation_ratio import variation_stats, variation_weights

    folders = [ModelFolder(p) for p in (pivot, *targets)]
    try:
        weights = []
        for name, info in folders[0].tensors.items():
            if len(info.shape) == 2:
                stats = variation_stats([f.read(name) for f in folders[1:]], folders[0].read(name))
                if float(stats[:, 0].sum()) > 0:
                    weights.append(variation_weights(stats)[0])
        return weights
    finally:
        for f in folders:
            f.close()


def _write_recipe(path: Path, body: dict[str, Any]) -> Path:
    header = "# Written by `fusemerge demo`; run it yourself with the matching fusemerge command.\n"
    atomic_write_text(path, header + yaml.safe_dump(body, sort_keys=False))
    return path
