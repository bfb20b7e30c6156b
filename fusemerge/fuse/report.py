"""`fusemerge fuse RECIPE --report`: how much of each teacher reaches the training target, per domain.

    fusemerge fuse recipe.yml --steps teach,align     # the stores the report reads
    fusemerge fuse recipe.yml --report                # one block per target; <work_dir>/report.json

Why: a fused target that barely beats its CLM-only twin can have several causes, and each leaves a trace
in the stores before any training: few pivot positions get a teacher distribution (the rest fall back to
the one-hot of the gold token, i.e. plain CLM), the transferred distributions rarely list the token that
actually comes next, MinCE keeps choosing a teacher that is worse on that domain, or the fusion term is a
small part of the gradient. Per target (one per source, pairwise) and per domain (a record's `domain`
field, else "all"), over the *trained* positions (rows t whose next token t + 1 is an assistant token,
where both loss terms act):

- coverage: the fraction of trained positions whose aligned row is a teacher distribution, not the
  align step's fallback (a row listing only the gold next token, log-prob 0);
- top-K hit: of the covered positions, the fraction whose transferred top-K lists the gold next token,
  beside the same fraction for the pivot's own top-K over all trained positions;
- picks: how many sequences each candidate wins in the sequence-level choice (`fusion.metric`, ties to
  the pivot, as `fusemerge.fuse.fusion.sequence_choice` decides it);
- gradient: on the first `batches` batches of the domain, the norms of the two loss terms' gradients,
  each with its weight, |lambda g_clm| and |(1 - lambda) g_fusion| (one backward per term, on the pivot's
  weights as training starts), the fusion term's share |g_f| / (|g_c| + |g_f|) and the cosine between the
  two. A fusion gradient that is small, or parallel to the CLM one, teaches nothing CLM would not.

`selection_counts` is also what the train step logs and writes into the target's card.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusemerge.fuse.fusion import Candidate, sequence_choice
from fusemerge.fuse.recipe import FuseRecipe
from fusemerge.fuse.store import TopKStore
from fusemerge.lm.chat_data import ChatData

ALL = "all"  # the domain of records without a `domain` field
REPORT_NAME = "report.json"  # under the work_dir


@dataclass
class DomainReport:
    """One target's numbers on one domain (counts; the fractions are properties)."""

    domain: str
    sequences: int = 0
    positions: int = 0  # trained positions (the next token is an assistant token)
    covered: int = 0  # of those, with a teacher distribution
    hits: int = 0  # of the covered, the transferred top-K lists the gold next token
    pivot_hits: int = 0  # of all trained positions, the pivot's own top-K lists it
    picks: dict[str, int] = field(default_factory=dict)  # candidate -> sequences it wins
    grad_clm: float | None = None  # |lambda * g_clm|
    grad_fusion: float | None = None  # |(1 - lambda) * g_fusion|
    grad_cosine: float | None = None

    @property
    def coverage(self) -> float:
        return self.covered / self.positions if self.positions else math.nan

    @property
    def hit_rate(self) -> float:
        return self.hits / self.covered if self.covered else math.nan

    @property
    def pivot_hit_rate(self) -> float:
        return self.pivot_hits / self.positions if self.positions else math.nan

    @property
    def fusion_share(self) -> float | None:
        if self.grad_clm is None or self.grad_fusion is None:
            return None
        total = self.grad_clm + self.grad_fusion
        return self.grad_fusion / total if total > 0 else math.nan

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "coverage": self.coverage,
            "hit_rate": self.hit_rate,
            "pivot_hit_rate": self.pivot_hit_rate,
            "fusion_share": self.fusion_share,
        }


# ---------------------------------------------------------------- domains and picks


def sequence_domains(recipe: FuseRecipe, data: ChatData, field_name: str = "domain") -> list[str]:
    """Each sequence's domain: its record's `domain` field, else "all" (read from the dataset again)."""
    from fusemerge.errors import FusemergeError
    from fusemerge.lm.chat import read_records

    assert recipe.dataset is not None
    try:
        named = {
            number: str(rec[field_name])
            for number, rec in read_records(recipe.dataset.path, recipe.dataset.split)
            if isinstance(rec, dict) and rec.get(field_name) not in (None, "")
        }
    except FusemergeError:  # `data` built by the caller (the Python API), not from the recipe's file
        named = {}
    return [named.get(seq.record, ALL) for seq in data.sequences]


def selection_counts(
    stores: Mapping[str, TopKStore], metric: str, domains: Sequence[str]
) -> dict[str, Counter[str]]:
    """Per domain, how many sequences each candidate (pivot first in `stores`) wins on `metric`.

    "none" counts sequences where no candidate has a value (every one NaN: no teacher)."""
    names = list(stores)
    values = np.stack([stores[n].metric(metric) for n in names])  # [C, N]
    empty = np.empty((0, 0), dtype=np.int32)
    out: dict[str, Counter[str]] = {}
    for i, domain in enumerate(domains):
        choice = sequence_choice(
            [Candidate(n, empty, empty, float(values[c, i])) for c, n in enumerate(names)]
        )
        out.setdefault(domain, Counter())[names[choice] if choice >= 0 else "none"] += 1
    return out


def selection_lines(counts: Mapping[str, Counter[str]], metric: str) -> list[str]:
    """`code: pivot 39% (47), code-specialist 61% (73)` per domain, for logs and cards."""
    lines = []
    for domain in sorted(counts):
        c = counts[domain]
        total = sum(c.values())
        parts = [f"{name} {100 * n / total:.0f}% ({n})" for name, n in c.most_common()]
        lines.append(f"{domain}: " + ", ".join(parts) + f" of {total} sequences by {metric}")
    return lines


# ---------------------------------------------------------------- alignment coverage and hits


def is_fallback(ids: np.ndarray, logprobs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Rows that are the align step's one-hot fallback: only the gold next token, log-prob 0 (or empty)."""
    listed = ids >= 0
    count = listed.sum(axis=1)
    single_gold = (count == 1) & (ids[:, 0] == gold) & (np.asarray(logprobs[:, 0], dtype=np.float32) == 0.0)
    return (count == 0) | single_gold


def alignment_counts(
    tokens: np.ndarray,
    labels_mask: np.ndarray,
    pivot_ids: np.ndarray,
    aligned_ids: np.ndarray,
    aligned_lp: np.ndarray,
) -> tuple[int, int, int, int]:
    """(trained positions, covered, hits among covered, pivot hits) of one sequence.

    Args:
        tokens: int [T] the pivot's tokens; labels_mask: bool [T], True where token t + 1 is trained.
        pivot_ids: int [T, K] the pivot's own top-K; aligned_ids, aligned_lp: [T, K] the source's, aligned.
    """
    gold = np.full(len(tokens), -1, dtype=np.int64)
    gold[:-1] = tokens[1:]
    rows = np.flatnonzero(labels_mask)
    gold = gold[rows]
    a_ids = np.asarray(aligned_ids[rows], dtype=np.int64)
    covered = ~is_fallback(a_ids, np.asarray(aligned_lp[rows]), gold)
    hit = covered & (a_ids == gold[:, None]).any(axis=1)
    pivot_hit = (np.asarray(pivot_ids[rows], dtype=np.int64) == gold[:, None]).any(axis=1)
    return len(rows), int(covered.sum()), int(hit.sum()), int(pivot_hit.sum())


# ---------------------------------------------------------------- gradient norms


def gradient_norms(
    model: Any, batches: Sequence[Mapping[str, Any]], lambda_: float, kind: str = "ce"
) -> tuple[float, float, float]:
    """(|lambda g_clm|, |(1 - lambda) g_fusion|, cosine) of the mean gradient over `batches`.

    The loss is linear in lambda (`fusemerge.fuse.loss`): lambda = 1 gives the CLM term alone and
    lambda = 0 the fusion term alone (one-hot at rows without a teacher, as in training), so each term's
    gradient is one backward of `fusion_loss` at that lambda, scaled by its weight afterwards.
    """
    import torch

    from fusemerge.fuse.loss import fusion_loss

    params = [p for p in model.parameters() if p.requires_grad]
    sums = {1.0: [torch.zeros_like(p, dtype=torch.float32) for p in params]}
    sums[0.0] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = next(model.parameters()).device
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        for lam in (1.0, 0.0):
            loss = fusion_loss(
                logits, inputs["labels"], inputs["target_ids"], inputs["target_probs"], lambda_=lam, kind=kind
            ).loss
            grads = torch.autograd.grad(loss, params, retain_graph=lam == 1.0, allow_unused=True)
            for acc, g in zip(sums[lam], grads, strict=True):
                if g is not None:
                    acc += g.float()
    n = max(1, len(batches))
    clm = torch.cat([g.flatten() for g in sums[1.0]]) / n
    fus = torch.cat([g.flatten() for g in sums[0.0]]) / n
    cosine = float(torch.nn.functional.cosine_similarity(clm, fus, dim=0)) if len(clm) else math.nan
    return lambda_ * float(clm.norm()), (1.0 - lambda_) * float(fus.norm()), cosine


# ---------------------------------------------------------------- the report


def fusion_report(
    recipe: FuseRecipe,
    data: ChatData,
    pivot_tokenizer: Any,
    pivot_store: TopKStore,
    aligned: Mapping[str, TopKStore],
    *,
    domains: Sequence[str] | None = None,
    batches: int = 2,
    model: Any = None,
) -> dict[str, list[DomainReport]]:
    """Per source (target), per domain, the numbers of the module docstring.

    Args:
        aligned: source name -> its aligned store (pairwise: each is one target's teacher).
        domains: each sequence's domain (default: `sequence_domains`).
        batches: batches of `training.batch_size` sequences per domain for the gradient norms; 0 skips them.
        model: the student to measure (default: the pivot in float32, on a GPU when there is one).
    """
    from fusemerge.fuse.collate import FusionCollator, FusionDataset
    from fusemerge.lm.padding import pad_token_id

    domains = list(domains) if domains is not None else sequence_domains(recipe, data)
    dataset = FusionDataset(data, pivot_tokenizer)
    fusion = recipe.fusion
    if batches and model is None and not recipe.fine_tune:
        model = _pivot_model(recipe)
    out: dict[str, list[DomainReport]] = {}
    for name, store in aligned.items():
        picks = selection_counts({"pivot": pivot_store, name: store}, fusion.metric, domains)
        reports = {d: DomainReport(d, picks=dict(picks[d])) for d in sorted(set(domains))}
        for i, domain in enumerate(domains):
            item = dataset[i]
            r = reports[domain]
            counts = alignment_counts(
                item["input_ids"],
                item["labels"] >= 0,
                pivot_store.sequence(i).ids,
                store.sequence(i).ids,
                store.sequence(i).logprobs,
            )
            r.sequences += 1
            r.positions += counts[0]
            r.covered += counts[1]
            r.hits += counts[2]
            r.pivot_hits += counts[3]
        if batches and model is not None and fusion.clm_weight < 1.0:
            collate = FusionCollator(
                pivot_store,
                {name: store},
                function=fusion.function,
                metric=fusion.metric,
                temperature=fusion.temperature,
                pad_id=pad_token_id(pivot_tokenizer, fallback=pivot_tokenizer.eos_token_id or 0),
            )
            size = recipe.training.batch_size
            for domain, r in reports.items():
                members = [i for i, d in enumerate(domains) if d == domain][: batches * size]
                chunks = [
                    collate([dataset[i] for i in members[j : j + size]]) for j in range(0, len(members), size)
                ]
                r.grad_clm, r.grad_fusion, r.grad_cosine = gradient_norms(
                    model, chunks, fusion.clm_weight, fusion.loss
                )
        out[name] = list(reports.values())
    return out


def _pivot_model(recipe: FuseRecipe) -> Any:
    import torch

    from fusemerge.lm.loading import load_causal_lm

    spec = recipe.pivot
    model = load_causal_lm(
        spec.model,
        dtype="float32",
        allow_pickle=True,
        trust_remote_code=spec.trust_remote_code,
        what="the pivot",
    )
    model.config.use_cache = False
    return model.to("cuda" if torch.cuda.is_available() else "cpu").train()


def report_lines(report: Mapping[str, list[DomainReport]], metric: str) -> list[str]:
    """The report as terminal lines: one block per target, one line per domain."""
    lines = []
    for name, rows in report.items():
        lines.append(f"report {name} (MinCE by {metric}):")
        for r in rows:
            picks = ", ".join(f"{k} {v}" for k, v in sorted(r.picks.items(), key=lambda kv: -kv[1]))
            grad = (
                f"; fusion gradient share {100 * r.fusion_share:.1f}% (|g_clm| {r.grad_clm:.3g}, "
                f"|g_fusion| {r.grad_fusion:.3g}, cosine {r.grad_cosine:.2f})"
                if r.fusion_share is not None
                else ""
            )
            lines.append(
                f"  {r.domain}: {r.sequences} sequences, {r.positions} trained positions, "
                f"{100 * r.coverage:.1f}% with a teacher distribution, its top-K holds the next token at "
                f"{100 * r.hit_rate:.1f}% (the pivot's own: {100 * r.pivot_hit_rate:.1f}%); "
                f"MinCE picks {picks}{grad}"
            )
    return lines


def run_report(
    recipe_path: str | Path, *, batches: int = 2, echo: Callable[[str], None] = print
) -> dict[str, list[DomainReport]]:
    """`fuse --report`: the report from the finished teach and align steps, printed and saved as JSON."""
    from fusemerge.checkpoint.layout import atomic_write_text
    from fusemerge.errors import FusemergeError
    from fusemerge.fuse.data import build_chat_data
    from fusemerge.fuse.inputs import open_fusion_inputs
    from fusemerge.fuse.recipe import load_fuse_recipe
    from fusemerge.fuse.workdir import FuseWorkDir
    from fusemerge.lm.loading import load_tokenizer

    recipe = load_fuse_recipe(recipe_path)
    if recipe.fusion.kind != "explicit" or recipe.fine_tune:
        raise FusemergeError(
            "--report diagnoses explicit fusion (teachers' distributions); this recipe has none",
            key="--report",
        )
    layout = FuseWorkDir(recipe)
    layout.require_teacher_stores()
    assert recipe.dataset is not None  # explicit fusion has one (FuseRecipe checks)
    pivot = recipe.pivot
    pivot_tokenizer = load_tokenizer(pivot.model, trust_remote_code=pivot.trust_remote_code)
    data = build_chat_data(recipe.dataset, pivot_tokenizer, recipe.chat_template, warn=echo)
    inputs = open_fusion_inputs(recipe)
    report = fusion_report(recipe, data, pivot_tokenizer, inputs.pivot, inputs.sources, batches=batches)
    for line in report_lines(report, recipe.fusion.metric):
        echo(line)
    path = layout.root / REPORT_NAME
    body = {name: [r.as_json() for r in rows] for name, rows in report.items()}
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True) + "\n")
    echo(f"report: {path}")
    return report
