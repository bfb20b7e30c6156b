"""The `score` step: every sample of one model scored, shard by shard, into `scores/<model>/`.

    run_score(name="qwen", samples=work / "samples/qwen", folder=work / "scores/qwen",
              prompts=prompts, spec=recipe.implicit.scoring, context=ScorerContext(spec))

A line's scorer is its domain's (`scoring.domains`, else `scoring.default`). A verifier's lines (a
scorer that sets `passed`) also get `tie_break`: the tie-break scorer's score (`scoring.tie_break`,
default `reward_model` when one is configured), which ranks equally correct answers in `pairs`.
Resumable and kill -9 safe like `sample` (the same manifest rules and shard protocol): a score shard
is derived from the sample shard of the same index, and the manifest binds it to the samples' identity
and the scoring settings; a mismatch is refused, never mixed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.layout import exclusive_lock, read_state
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.prompts import PromptSet
from fusemerge.fuse.implicit.sample import (
    FORMAT_VERSION,
    check_identity,
    finish_state,
    read_jsonl,
    shard_name,
    write_jsonl,
)
from fusemerge.fuse.implicit.scorers import SCORERS, ScoreItem, ScorerContext, ScoreResult
from fusemerge.fuse.implicit.spec import ScoringSpec
from fusemerge.progress import progress_bar as bar


def scorer_of(domain: str, *, spec: ScoringSpec) -> str:
    """The scorer a domain's responses get."""
    return spec.domains.get(domain, spec.default)


def tie_break_of(spec: ScoringSpec) -> str | None:
    """The scorer that ranks equally correct answers: `tie_break`, else the reward model when configured."""
    if spec.tie_break is not None:
        return spec.tie_break
    return "reward_model" if spec.reward_model is not None else None


def check_scorers(spec: ScoringSpec) -> None:
    """Every scorer the section names is registered: a typo fails before any model loads, naming its key.

    Args:
        spec: the recipe's `implicit.scoring` section.
    """
    named = [("implicit.scoring.default", spec.default)]
    named += [(f"implicit.scoring.domains.{domain}", name) for domain, name in spec.domains.items()]
    if spec.tie_break is not None:
        named.append(("implicit.scoring.tie_break", spec.tie_break))
    for key, name in named:
        SCORERS.get(name, key=key)


def score_identity(*, samples_identity: dict[str, Any], spec: ScoringSpec) -> dict[str, Any]:
    """What a model's scores depend on: its samples and the scoring settings (not the worker count).

    Args:
        samples_identity: the `identity` of the samples folder's manifest.
        spec: the scoring section.
    """
    from fusemerge.fuse.teacher import model_fingerprint

    settings = spec.model_dump(mode="json")
    settings["code_tests"].pop("workers", None)
    rm = spec.reward_model
    return {
        "kind": "scores",
        "format": FORMAT_VERSION,
        "samples": samples_identity,
        "scoring": settings,
        "reward_model_fingerprint": None if rm is None else model_fingerprint(rm.model),
        "n_shards": samples_identity["n_shards"],
    }


@dataclass
class ScoreReport:
    name: str
    folder: Path
    shards_total: int
    shards_done: int = 0
    scored: int = 0
    seconds: float = 0.0
    skipped: bool = False

    @property
    def scored_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def score_lines(
    lines: list[dict[str, Any]], *, prompts: PromptSet, context: ScorerContext
) -> list[dict[str, Any]]:
    """The sample lines with `score`, `scorer`, `passed`, `tie_break` and `detail` added, in the same order.

    Args:
        lines: sample lines (one shard).
        prompts: the prompt records (gold answers and tests).
        context: the scoring section, progress flag and loaded-model cache.
    """
    records = prompts.by_id()
    spec = context.spec
    groups: dict[str, list[int]] = defaultdict(list)
    items: list[ScoreItem] = []
    for i, line in enumerate(lines):
        record = records.get(line["prompt_id"])
        if record is None:
            raise FusemergeError(f"sample of unknown prompt {line['prompt_id']}: the prompts changed")
        items.append(
            ScoreItem(
                prompt_id=record.prompt_id,
                prompt=record.messages,
                response=line["response"],
                domain=record.domain,
                answer=record.answer,
                tests=record.tests,
            )
        )
        groups[scorer_of(record.domain, spec=spec)].append(i)
    results: list[ScoreResult | None] = [None] * len(lines)
    scorer_names: list[str] = [""] * len(lines)
    for name, indices in groups.items():
        entry = SCORERS.get(name, key="implicit.scoring")
        for i, result in zip(indices, entry.fn([items[i] for i in indices], context=context), strict=True):
            results[i] = result
            scorer_names[i] = name
    tie: list[float | None] = [None] * len(lines)
    tie_name = tie_break_of(spec)
    verified = [i for i, r in enumerate(results) if r is not None and r.passed is not None]
    if tie_name is not None and verified:
        entry = SCORERS.get(tie_name, key="implicit.scoring.tie_break")
        for i, result in zip(verified, entry.fn([items[i] for i in verified], context=context), strict=True):
            tie[i] = result.score
    out = []
    for line, result, name, tb in zip(lines, results, scorer_names, tie, strict=True):
        assert result is not None
        out.append(
            {
                **line,
                "score": result.score,
                "scorer": name,
                "passed": result.passed,
                "tie_break": tb,
                "detail": result.detail,
            }
        )
    return out


def run_score(
    *,
    name: str,
    samples: str | Path,
    folder: str | Path,
    prompts: PromptSet,
    spec: ScoringSpec,
    context: ScorerContext | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    rebuild: bool = False,
) -> ScoreReport:
    """Score (or finish scoring) one model's samples; a complete matching folder is skipped.

    Args:
        name: the model's folder name (for messages).
        samples: its complete samples folder.
        folder: `<work_dir>/implicit/scores/<model>`.
        prompts: the prompt records the samples were made from.
        spec: the recipe's `implicit.scoring` section.
        context: share one between models so the reward model loads once; default a new one.
        progress: a bar with scores/s.
        echo: where one-line status messages go.
        rebuild: start over when the folder was made from different inputs (else that is an error).
    """
    samples, folder = Path(samples), Path(folder)
    sample_state = read_state(samples)
    if not sample_state.get("complete"):
        raise FusemergeError("the samples are not complete: run the sample step first", file=samples)
    if sample_state["identity"]["prompts_hash"] != prompts.fingerprint():
        raise FusemergeError("these samples were made from different prompts: sample again", file=samples)
    check_scorers(spec)
    context = context or ScorerContext(spec, progress=progress)
    identity = score_identity(samples_identity=sample_state["identity"], spec=spec)
    n_shards = identity["n_shards"]
    report = ScoreReport(name, folder, n_shards)
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder, what="score"):
        check_identity(folder, identity, what="score", rebuild=rebuild)
        pending = [j for j in range(n_shards) if not (folder / shard_name(j)).is_file()]
        if not pending:
            finish_state(folder)
            report.skipped = True
            echo(f"score {name}: {n_shards} shards complete, skipped ({folder})")
            return report
        total = sum(_count_lines(samples / shard_name(j)) for j in pending)  # one shard in memory at a time
        echo(f"score {name}: {len(pending)} of {n_shards} shards, {total} samples to score")
        start = time.perf_counter()
        with bar(total, f"score {name}", enabled=progress, unit="sample") as pbar:
            for j in pending:
                scored = score_lines(read_jsonl(samples / shard_name(j)), prompts=prompts, context=context)
                write_jsonl(folder / shard_name(j), scored)
                report.shards_done += 1
                report.scored += len(scored)
                pbar.update(len(scored))
        report.seconds = time.perf_counter() - start
        finish_state(folder, scored_per_s=round(report.scored_per_s, 3))
    echo(f"score {name}: {report.scored} samples in {report.seconds:.1f}s ({report.scored_per_s:.2f}/s)")
    return report


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
