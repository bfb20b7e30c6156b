"""The fusion ablation on the demo's data: which setting makes a fused target beat CLM-only by the most.

    python bench/fusion_ablation.py --out bench-out/fusion-ablation            # every setting, seeds 42 1 2
    python bench/fusion_ablation.py --out /tmp/abl --settings paper,per_byte --seeds 42 --tiny   # a smoke run
    python bench/fusion_ablation.py --out bench-out/fusion-ablation --table     # the table of what is done
    python bench/fusion_ablation.py --diagnose RECIPE CLM_ONLY_TARGET  # teacher vs the student's own fine-tune

The demo's corpus and pre-trained models (`fusemerge.demo.corpus`, `fusemerge.demo.pretrain`, the demo's
own plans) are built once under OUT and reused (a model folder whose stamp matches is kept); the teacher
pass runs once (OUT/work-teach; its stores hold both metrics); each (alignment, span rules) pair runs
once in its own work dir (the teacher stores shared by a symlink); then per seed the CLM-only baseline and, per setting, both pairwise targets
are trained and scored on the held-out file in bits per byte, as `fusemerge demo` does.

Settings vary one factor at a time from one of two bases, both read from `fusemerge.demo.fusion`: the
paper's (`PAPER`: lambda 0.9, MinCE per token, dtw + stats, T = 1) and the demo's recommended one
(`RECOMMENDED`, the row `demo`: MinCE per byte, offsets + prefix); span rules a setting does not name are
the recipe's default (`alignment.spans: chain`). Each finished
(setting, seed) prints one JSON line (also appended to OUT/results.jsonl, so a rerun skips it) with, per
domain, the target's and the CLM-only baseline's bits per byte and the gain in percent (negative: the
fused target is better). The end prints a markdown table: mean and spread (sample standard deviation)
over seeds of each gain. Seeds run in the outer loop, so an interrupted run still has whole seeds.

Timings and results are from a 2-core CPU shared with other jobs; torch runs on one thread (faster there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fusemerge.demo.fusion import PAPER as DEMO_PAPER
from fusemerge.demo.fusion import RECOMMENDED as DEMO_RECOMMENDED
from fusemerge.fuse.recipe import AlignmentSpec

SPANS_DEFAULT = AlignmentSpec.model_fields["spans"].default  # what a setting that names no spans runs


def flat(section: dict[str, dict[str, Any]], function: str = "mince") -> dict[str, Any]:
    """A demo setting (`alignment` and `fusion` sections, `fusemerge.demo.fusion`) as one flat row."""
    a, f = section["alignment"], section["fusion"]
    return {
        "function": function,
        "lambda": f["lambda"],
        "metric": f["metric"],
        "alignment": f"{a['tokens']}+{a['vocab']}",
        "spans": a.get("spans", SPANS_DEFAULT),
        "temperature": f["temperature"],
    }


# The two bases, read from the demo (never copied), so the ablation measures around what the demo runs.
PAPER = flat(DEMO_PAPER)
DEMO = flat(DEMO_RECOMMENDED)
# name -> (base, the one factor changed). `paper`-based rows are the first ablation's; `demo`-based rows
# vary one factor from the demo's recommended setting (`demo+exact`: the span rules before `chain`, i.e.
# the first ablation's `per_byte+offsets`; `demo+mince_token`: the teacher chosen per token).
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper": (PAPER, {}),
    "lambda0.7": (PAPER, {"lambda": 0.7}),
    "lambda0.5": (PAPER, {"lambda": 0.5}),
    "per_byte": (PAPER, {"metric": "ce_per_byte"}),
    "offsets+prefix": (PAPER, {"alignment": "offsets+prefix"}),
    "T2": (PAPER, {"temperature": 2.0}),
    "demo": (DEMO, {}),
    "demo+exact": (DEMO, {"spans": "exact"}),
    "demo+mince_token": (DEMO, {"function": "mince_token"}),
    "demo+lambda0.7": (DEMO, {"lambda": 0.7}),
}


def setting(name: str) -> dict[str, Any]:
    base, change = SETTINGS[name]
    return {**base, **change}


def work_name(s: dict[str, Any]) -> str:
    """The work dir of a setting's aligned stores: one per (alignment, span rules)."""
    return f"work-{s['alignment']}-{s['spans']}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_inputs(out: Path, plan: Any) -> tuple[Any, Path, dict[str, Path]]:
    """The demo's corpus and models under OUT (reused when their stamps match)."""
    from fusemerge.demo.corpus import build_corpus
    from fusemerge.demo.pretrain import pretrain_demo_models

    corpus = build_corpus(out / "data", plan.corpus)
    pivot, specialists = pretrain_demo_models(
        out / "models", plan.pivot, plan.specialists, corpus, progress=False, echo=log
    )
    return corpus, pivot, specialists


def recipe_body(
    plan: Any,
    pivot: Path,
    specialists: dict[str, Path],
    corpus: Any,
    work: Path,
    s: dict,
    seed: int,
    tiny: bool,
) -> dict[str, Any]:
    tokens, vocab = s["alignment"].split("+")
    fuse = json.loads(json.dumps(plan.fuse))
    fuse["alignment"] = {"tokens": tokens, "vocab": vocab, "spans": s["spans"]}
    fuse["fusion"] = {
        **fuse["fusion"],
        "function": s["function"],
        "lambda": s["lambda"],
        "metric": s["metric"],
        "temperature": s["temperature"],
    }
    fuse["training"] = {**fuse["training"], "seed": seed}
    if tiny:
        fuse["training"]["max_steps"] = 2
    dataset = {"path": str(corpus.fusion_file), "format": "openai", "max_length": 512}
    if tiny:
        dataset["limit"] = 24
    return {
        "pivot": str(pivot),
        "sources": [str(p) for p in specialists.values()],
        "dataset": dataset,
        **fuse,
        "work_dir": str(work),
    }


def write_recipe(path: Path, body: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


TEACH_WORK = "work-teach"  # the teacher stores, shared by every alignment's work dir through a symlink


def prepare_work(out: Path, variants: list[dict[str, Any]], body_for: Any) -> None:
    """Teach once (in OUT/work-teach), share its stores, align each (alignment, spans) variant once."""
    from fusemerge.fuse.pipeline import run_fuse

    teach = out / TEACH_WORK
    recipe = write_recipe(out / "recipes" / "teach.yml", body_for(variants[0], "teach", work=teach))
    run_fuse(recipe, steps=["teach"], progress=False, echo=log)
    for s in variants:
        work = out / work_name(s)
        work.mkdir(parents=True, exist_ok=True)
        link = work / "teacher"
        if not link.exists():
            link.symlink_to((teach / "teacher").resolve(), target_is_directory=True)
        recipe = write_recipe(out / "recipes" / f"align-{work_name(s)}.yml", body_for(s, "align"))
        run_fuse(recipe, steps=["align"], progress=False, echo=log)


def split_heldout(heldout: Path, folder: Path) -> dict[str, Path]:
    """The held-out file cut by its records' domain, so a target is scored on its teacher's domain only."""
    by_domain: dict[str, list[str]] = {}
    for line in heldout.read_text(encoding="utf-8").splitlines():
        if line.strip():
            by_domain.setdefault(json.loads(line)["domain"], []).append(line + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for domain, lines in by_domain.items():
        files[domain] = folder / f"heldout-{domain}.jsonl"
        files[domain].write_text("".join(lines), encoding="utf-8")
    return files


def bits_per_byte(folder: Path, heldout: Path, domain: str) -> float:
    """Held-out bits per byte of one model on one domain, as `fusemerge demo` scores it (float32)."""
    from fusemerge.evaluate import evaluate_models

    report = evaluate_models([folder], [heldout], dtype="float32", progress=False)
    return report.score(str(folder), domain).bits_per_byte


def read_done(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per setting, mean and spread over seeds of each fused target's gain over CLM-only."""
    lines = [
        "| setting | function | lambda | metric | alignment | spans | T | seeds "
        "| code target vs CLM-only, code (%) | chat target vs CLM-only, chat (%) "
        "| code bits/byte | chat bits/byte |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = list(dict.fromkeys(r["setting"] for r in rows))
    names = [n for n in SETTINGS if n in seen] + [n for n in seen if n not in SETTINGS]
    for name in names:
        runs = [r for r in rows if r["setting"] == name]
        # what the rows record they ran; rows written before `function` and `spans` were recorded were
        # all MinCE per sequence with the span rules of then (`exact`)
        s = {"function": "mince", "spans": "exact", **runs[0]}

        def stat(key: str, runs: list[dict[str, Any]] = runs, pct: bool = True) -> str:
            values = [r[key] for r in runs]
            mean = statistics.fmean(values)
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            digits = 2 if pct else 4
            tail = "" if math.isnan(spread) else f" ± {spread:.{digits}f}"
            return f"{mean:+.{digits}f}{tail}" if pct else f"{mean:.{digits}f}{tail}"

        lines.append(
            f"| {name} | {s['function']} | {s['lambda']} | {s['metric']} | {s['alignment']} "
            f"| {s['spans']} | {s['temperature']:g} "
            f"| {len(runs)} | {stat('code_gain_pct')} | {stat('chat_gain_pct')} "
            f"| {stat('code_bpb', pct=False)} | {stat('chat_bpb', pct=False)} |"
        )
    clm = {r["seed"]: r for r in rows}
    if clm:
        code = [r["clm_code_bpb"] for r in clm.values()]
        chat = [r["clm_chat_bpb"] for r in clm.values()]
        sd = lambda v: f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""  # noqa: E731
        lines.append(
            f"| CLM-only (baseline) | none | 1 | - | - | - | - | {len(clm)} | 0 | 0 "
            f"| {statistics.fmean(code):.4f}{sd(code)} | {statistics.fmean(chat):.4f}{sd(chat)} |"
        )
    return "\n".join(lines)


def with_specialist(plan: Any, changes: list[str]) -> Any:
    """The demo's plan with specialists' `ModelPlan` fields changed (`code:epochs=9,hidden_size=96`)."""
    import dataclasses

    specialists = dict(plan.specialists)
    for change in changes:
        domain, _, fields = change.partition(":")
        if domain not in specialists:
            raise SystemExit(
                f"--specialist {change!r}: no {domain!r} specialist, choose from {list(specialists)}"
            )
        base = specialists[domain]
        kinds = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(base)}
        values = dict(item.split("=", 1) for item in fields.split(",") if item)
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise SystemExit(f"--specialist {change!r}: ModelPlan has no {unknown}")
        specialists[domain] = dataclasses.replace(base, **{k: kinds[k](v) for k, v in values.items()})
    return dataclasses.replace(plan, specialists=tuple(specialists.items()))


def topk_gold(
    model: Any, input_ids: np.ndarray, rows: np.ndarray, gold: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(hit, p) per row, one forward: does the model's own top-k list the gold next token, and the
    probability it gives that token inside its top-k (0 where it is not listed: what a top-k store of
    this model would hold, comparable with a teacher's transferred top-K)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(input_ids[None], dtype=torch.long)).logits[0]
    logp = torch.log_softmax(logits[torch.as_tensor(rows, dtype=torch.long)].float(), dim=-1)
    top = torch.topk(logp, k, dim=-1)
    listed = top.indices.numpy() == gold[:, None]
    probs = np.where(listed, np.exp(top.values.numpy()), 0.0).max(axis=1, initial=0.0)
    return listed.any(axis=1), probs


def gold_prob(ids: np.ndarray, logprobs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """A stored top-K's probability of the gold next token per row (0 where it is not listed)."""
    listed = (np.asarray(ids, dtype=np.int64) == gold[:, None]) & (ids >= 0)
    lp = np.asarray(logprobs, dtype=np.float64)
    return np.where(listed, np.exp(np.where(listed, lp, 0.0)), 0.0).max(axis=1, initial=0.0)


COUNTS = ("covered", "hit", "clm", "pivot", "clm_all", "p_teacher", "p_pivot", "p_clm")


def diagnose(recipe_path: Path, baseline: Path, echo: Any = log) -> list[dict[str, Any]]:
    """Why fusion adds little, per target and domain, on the fusion data's trained positions.

        From the finished teach and align steps of `recipe_path` (what `fuse --report` reads) and the CLM-only
        target `baseline` trained on the same data: the teacher's coverage and how often its transferred top-K
        holds the gold next token on the covered positions, beside the same rate for the pivot's own top-K and
        for the CLM-only target's (its fine-tune has seen these positions: the question is whether the teacher
        still knows something the student's own fine-tune does not), and the bits per byte on the fusion data
        of the pivot, the teacher and the CLM-only target (`fusemerge eval`'s measure), and the mean probability
    each one's top-K gives the gold next token on the covered positions (for the teacher: the transferred
    distribution the fusion term trains toward). One record per
        (target, domain).
    """
    from fusemerge.evaluate import evaluate_models
    from fusemerge.fuse.collate import FusionDataset
    from fusemerge.fuse.data import build_chat_data
    from fusemerge.fuse.inputs import open_fusion_inputs
    from fusemerge.fuse.recipe import load_fuse_recipe
    from fusemerge.fuse.report import fusion_report, is_fallback, sequence_domains
    from fusemerge.fuse.workdir import FuseWorkDir
    from fusemerge.lm.loading import load_causal_lm, load_tokenizer

    recipe = load_fuse_recipe(recipe_path)
    assert recipe.dataset is not None
    tokenizer = load_tokenizer(recipe.pivot.model, trust_remote_code=recipe.pivot.trust_remote_code)
    data = build_chat_data(recipe.dataset, tokenizer, recipe.chat_template, warn=echo)
    inputs = open_fusion_inputs(recipe)
    domains = sequence_domains(recipe, data)
    report = fusion_report(recipe, data, tokenizer, inputs.pivot, inputs.sources, domains=domains, batches=0)
    model = load_causal_lm(str(baseline), dtype="float32", what="the CLM-only target").eval()
    dataset = FusionDataset(data, tokenizer)
    k = recipe.teacher.top_k
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for i, domain in enumerate(domains):
        item = dataset[i]
        rows = np.flatnonzero(item["labels"] >= 0)
        if not len(rows):
            continue
        gold = np.asarray(item["labels"][rows], dtype=np.int64)
        clm_hit, clm_p = topk_gold(model, item["input_ids"], rows, gold, k)
        own = inputs.pivot.sequence(i)
        pivot_hit = (np.asarray(own.ids[rows], dtype=np.int64) == gold[:, None]).any(1)
        pivot_p = gold_prob(own.ids[rows], own.logprobs[rows], gold)
        for name, store in inputs.sources.items():
            seq = store.sequence(i)
            ids = np.asarray(seq.ids[rows], dtype=np.int64)
            covered = ~is_fallback(ids, np.asarray(seq.logprobs[rows]), gold)
            hit = covered & (ids == gold[:, None]).any(axis=1)
            c = counts.setdefault((name, domain), dict.fromkeys(COUNTS, 0.0))
            c["covered"] += int(covered.sum())
            c["hit"] += int(hit.sum())
            c["clm"] += int((clm_hit & covered).sum())
            c["pivot"] += int((pivot_hit & covered).sum())
            c["clm_all"] += int(clm_hit.sum())
            c["p_teacher"] += float(gold_prob(ids, seq.logprobs[rows], gold)[covered].sum())
            c["p_pivot"] += float(pivot_p[covered].sum())
            c["p_clm"] += float(clm_p[covered].sum())
    del model
    layout = FuseWorkDir(recipe)
    sources = dict(zip(layout.source_names, (s.model for s in recipe.sources), strict=True))
    folders = [recipe.pivot.model, *sources.values(), str(baseline)]
    scores = evaluate_models(
        folders, [recipe.dataset.path], dtype="float32", max_length=recipe.dataset.max_length, progress=False
    )
    out = []
    for name, rows_ in report.items():
        for r in rows_:
            c = counts.get((name, r.domain), {})
            covered = max(1, c.get("covered", 0))
            bpb = {
                role: round(scores.score(str(folder), r.domain).bits_per_byte, 4)
                for role, folder in (
                    ("pivot", recipe.pivot.model),
                    ("teacher", sources[name]),
                    ("clm", baseline),
                )
            }
            out.append(
                {
                    "diagnosis": str(recipe_path),
                    "target": name,
                    "domain": r.domain,
                    "positions": r.positions,
                    "coverage": round(r.coverage, 4),
                    "top_k": k,
                    "hit_on_covered": {
                        "teacher": round(c.get("hit", 0) / covered, 4),
                        "pivot": round(c.get("pivot", 0) / covered, 4),
                        "clm": round(c.get("clm", 0) / covered, 4),
                    },
                    "hit_all_positions": {
                        "pivot": round(r.pivot_hit_rate, 4),
                        "clm": round(c.get("clm_all", 0) / max(1, r.positions), 4),
                    },
                    # mean probability of the gold next token inside each one's top-K, covered positions
                    "gold_prob_on_covered": {
                        "teacher": round(c.get("p_teacher", 0) / covered, 4),
                        "pivot": round(c.get("p_pivot", 0) / covered, 4),
                        "clm": round(c.get("p_clm", 0) / covered, 4),
                    },
                    "picks": r.picks,
                    "fusion_data_bits_per_byte": bpb,
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/fusion-ablation"))
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS)
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--tiny", action="store_true", help="24 records, 2 optimizer steps: a smoke run")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.jsonl and stop")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument(
        "--diagnose",
        type=Path,
        nargs=2,
        metavar=("RECIPE", "CLM_ONLY"),
        help="print diagnose()'s JSON lines for a fuse recipe whose teach and align steps ran, beside the "
        "CLM-only target trained on its data (any recipe: the demo's, bench/real_fusion.py's), and stop",
    )
    parser.add_argument(
        "--specialist",
        action="append",
        default=[],
        metavar="DOMAIN:KEY=VALUE,...",
        help="change one specialist's pre-training plan (ModelPlan fields), e.g. code:epochs=9,hidden_size=96: "
        "a teacher-strength point; use its own OUT, the demo's defaults stay as they are",
    )
    args = parser.parse_args(argv)
    if args.diagnose:
        import torch

        torch.set_num_threads(args.threads)
        for record in diagnose(*args.diagnose):
            print(json.dumps(record), flush=True)
        return 0
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    out: Path = args.out.resolve()
    results = out / "results.jsonl"
    if args.table:
        print(table(read_done(results)))
        return 0

    import torch

    from fusemerge.demo.fusion import DemoPlan
    from fusemerge.fuse.pipeline import run_fuse
    from fusemerge.fuse.recipe import load_fuse_recipe
    from fusemerge.fuse.workdir import FuseWorkDir

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.monotonic()
    plan = with_specialist(DemoPlan(), args.specialist)
    corpus, pivot, specialists = build_inputs(out, plan)

    def body_for(s: dict[str, Any], what: str, seed: int = 42, work: Path | None = None) -> dict[str, Any]:
        work = work or out / work_name(s)
        return recipe_body(plan, pivot, specialists, corpus, work, s, seed, args.tiny) | {
            "output": str(out / "runs" / what)
        }

    variants = list({work_name(setting(n)): setting(n) for n in names}.values())
    prepare_work(out, variants, body_for)
    log(f"inputs ready ({time.monotonic() - start:.0f} s)")
    heldout = split_heldout(corpus.heldout_file, out / "data-by-domain")
    done = {(r["setting"], r["seed"]) for r in read_done(results)}
    for seed in args.seeds:
        base_body = body_for(DEMO, f"clm-only-s{seed}", seed=seed, work=out / TEACH_WORK)
        base_body["fusion"] = {"function": "none"}
        clm_recipe = write_recipe(out / "recipes" / f"clm-only-s{seed}.yml", base_body)
        clm = run_fuse(clm_recipe, steps=["train"], progress=False, echo=log)
        clm_folder = next(p for k, p in clm.items() if k.startswith("target/"))
        clm_bpb: dict[str, float] = {}
        for name in names:
            if (name, seed) in done:
                continue
            if not clm_bpb:
                clm_bpb = {d: bits_per_byte(clm_folder, heldout[d], d) for d in specialists}
            s = setting(name)
            t0 = time.monotonic()
            recipe = write_recipe(
                out / "recipes" / f"{name}-s{seed}.yml", body_for(s, f"{name}-s{seed}", seed)
            )
            made = run_fuse(recipe, steps=["train"], progress=False, echo=log)
            layout = FuseWorkDir(load_fuse_recipe(recipe))
            targets = {d: made[t.key] for d, t in zip(specialists, layout.targets, strict=True)}
            row: dict[str, Any] = {"setting": name, "seed": seed, **s}
            for domain in specialists:
                mine, base = bits_per_byte(targets[domain], heldout[domain], domain), clm_bpb[domain]
                row[f"{domain}_bpb"] = mine
                row[f"clm_{domain}_bpb"] = base
                row[f"{domain}_gain_pct"] = 100.0 * (mine - base) / base
            row["seconds"] = round(time.monotonic() - t0, 1)
            print(json.dumps(row), flush=True)
            with results.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
    print(table(read_done(results)))
    log(f"done in {(time.monotonic() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
