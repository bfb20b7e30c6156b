"""The `pairs` step: scored samples -> `sft.jsonl` (best response per prompt) and `preference.jsonl`.

The rules, as FuseChat-3.0 built its data (README "Data Construction"):

- The prompts are split `sft_fraction : rest` by a seeded hash of their ids, so a prompt's side never
  depends on the file order or on which other prompts are present.
- Ranking: a verifier's verdict first (`passed`, as `score` 1/0), then the tie-break (the reward model);
  for reward-model domains the reward itself. Equal keys keep the earlier model (recipe order) and sample.
- SFT: the best *source* response per prompt; in a verified domain only a correct one (a prompt with no
  correct response gives no SFT example).
- Preference: chosen and rejected from the *same source* (`same_source`), its highest and lowest ranked
  responses; in a verified domain chosen must pass and rejected must fail. The reward gap between them
  (the reward model's values: `score`, or `tie_break` for verified lines, where both have one) must be
  above `min_reward_gap` and at most `max_reward_gap` (FuseChat-3.0: 0.01 to 0.1 for ArmoRM). Of the
  sources that give a valid pair, the one with the best chosen response gives the prompt's one pair.
- WRPO: `chosen_target` is the pivot's own best response to the prompt (its on-policy sample), when the
  pivot answered (`sampling.include_pivot`); in a verified domain it must pass, as the source's chosen
  response must (WRPO, arXiv 2412.03187: the target-chosen response is the highest-rewarded of the
  target's own samples, a preferred response). A pair whose pivot has no correct answer has none, and
  WRPO leaves it out.

All score folders share the prompts and the shard size (checked), so shard j of every model holds the
same prompts: the step works one shard index at a time and its memory is bounded by a shard. Output
files are written under temporary names and renamed when complete; the manifest
(`.fusemerge/pairs.json`) records the inputs' identities and the rules, so a rerun with the same
inputs is skipped and one with changed inputs rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.layout import (
    STATE_DIR,
    atomic_write_text,
    publish,
    read_state,
    remove_path,
    stale_tmp_siblings,
    tmp_sibling,
)
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.sample import read_jsonl, shard_name
from fusemerge.fuse.implicit.spec import PairsSpec
from fusemerge.progress import progress_bar

SFT_NAME = "sft.jsonl"
PREFERENCE_NAME = "preference.jsonl"
MANIFEST_NAME = "pairs.json"
Line = dict[str, Any]


def in_sft_split(prompt_id: str, *, fraction: float, seed: int) -> bool:
    """Whether a prompt goes to SFT: a uniform draw from its id and the seed, below `fraction`.

    Args:
        prompt_id: the prompt's stable id.
        fraction: `pairs.sft_fraction`.
        seed: `pairs.seed`.
    """
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def rank_key(line: Line) -> tuple[float, float]:
    """Verifier verdict (or reward) first, then the tie-break; a missing tie-break ranks lowest."""
    tie = line.get("tie_break")
    return (float(line["score"]), float("-inf") if tie is None else float(tie))


def reward_value(line: Line) -> float | None:
    """The reward model's value of a line: its score, or for a verified line its tie-break (None without)."""
    if line.get("passed") is None:
        return float(line["score"])
    tie = line.get("tie_break")
    return None if tie is None else float(tie)


def _best(lines: Sequence[Line]) -> Line | None:
    best = None
    for line in lines:  # strictly greater: equal keys keep the earlier line
        if best is None or rank_key(line) > rank_key(best):
            best = line
    return best


def _worst(lines: Sequence[Line]) -> Line | None:
    worst = None
    for line in lines:  # equal keys take the later line, so equal responses never pair with themselves
        if worst is None or rank_key(line) <= rank_key(worst):
            worst = line
    return worst


def _verified(lines: Sequence[Line]) -> bool:
    return any(line.get("passed") is not None for line in lines)


def _answered(lines: Sequence[Line]) -> list[Line]:
    """The lines with a non-blank response: the SFT and preference readers refuse a blank turn, so a blank
    answer (a model that stopped at once) is neither a chosen, a rejected nor an SFT response."""
    return [line for line in lines if str(line.get("response", "")).strip()]


def sft_example(lines: Sequence[Line]) -> Line | None:
    """The best source response of one prompt, or None (no responses; no correct one in a verified domain).

    Args:
        lines: the scored source lines of one prompt, in model then sample order.
    """
    lines = _answered(lines)
    if _verified(lines):
        lines = [line for line in lines if line.get("passed") is True]
    best = _best(lines)
    if best is None:
        return None
    return {
        "messages": [*best["prompt"], {"role": "assistant", "content": best["response"]}],
        "prompt_id": best["prompt_id"],
        "domain": best["domain"],
        "model": best["model"],
        "score": best["score"],
    }


def candidate_pair(lines: Sequence[Line], *, spec: PairsSpec) -> tuple[Line, Line] | str:
    """(chosen, rejected) from these lines under the rules, or the reason there is none.

    Args:
        lines: the scored lines the pair may come from (one source's, or every source's).
        spec: the pairs section (reward-gap bounds).
    """
    lines = _answered(lines)
    if _verified(lines):
        chosen = _best([line for line in lines if line.get("passed") is True])
        rejected = _worst([line for line in lines if line.get("passed") is False])
        if chosen is None or rejected is None:
            return "no correct and incorrect response"
    else:
        chosen, rejected = _best(lines), _worst(lines)
        if chosen is None or rejected is None or chosen is rejected:
            return "fewer than two responses"
    rc, rr = reward_value(chosen), reward_value(rejected)
    if rc is not None and rr is not None:
        gap = rc - rr
        if gap <= spec.min_reward_gap:
            return "reward gap too small"
        if spec.max_reward_gap is not None and gap > spec.max_reward_gap:
            return "reward gap too large"
    return chosen, rejected


def target_chosen(lines: Sequence[Line]) -> Line | None:
    """The pivot's best response to a prompt, WRPO's target-chosen one; in a verified domain only a correct
    one (a wrong answer is no "chosen" response however the tie-break ranks it), else None.

    Args:
        lines: the pivot's scored lines of one prompt.
    """
    lines = _answered(lines)
    if _verified(lines):
        lines = [line for line in lines if line.get("passed") is True]
    return _best(lines)


def preference_pair(
    by_model: dict[str, list[Line]], *, sources: Sequence[str], pivot: str | None, spec: PairsSpec
) -> Line | str:
    """One prompt's preference pair (TRL's conversational format), or the reason it has none.

    Args:
        by_model: the prompt's scored lines per model name.
        sources: the source names in recipe order (ties go to the earlier one).
        pivot: the pivot's name when it answered (its best response becomes `chosen_target`).
        spec: the pairs section.
    """
    if spec.same_source:
        found: list[tuple[Line, Line]] = []
        reasons: list[str] = []
        for name in sources:
            pair = candidate_pair(by_model.get(name, []), spec=spec)
            (reasons if isinstance(pair, str) else found).append(pair)  # type: ignore[arg-type]
        if not found:
            return reasons[0] if reasons else "no source responses"
        best_chosen = _best([c for c, _ in found])
        chosen, rejected = next((c, r) for c, r in found if c is best_chosen)
    else:
        pair = candidate_pair([line for name in sources for line in by_model.get(name, [])], spec=spec)
        if isinstance(pair, str):
            return pair
        chosen, rejected = pair
    out: Line = {
        "prompt": chosen["prompt"],
        "chosen": [{"role": "assistant", "content": chosen["response"]}],
        "rejected": [{"role": "assistant", "content": rejected["response"]}],
        "prompt_id": chosen["prompt_id"],
        "domain": chosen["domain"],
        "model": chosen["model"],
        "rejected_model": rejected["model"],
        "chosen_score": chosen["score"],
        "rejected_score": rejected["score"],
    }
    target = target_chosen(by_model.get(pivot, [])) if pivot is not None else None
    if target is not None:
        out["chosen_target"] = [{"role": "assistant", "content": target["response"]}]
        out["chosen_target_score"] = target["score"]
    return out


@dataclass
class PairsReport:
    folder: Path
    prompts: int = 0
    sft: int = 0
    preference: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> prompts without an example/pair
    seconds: float = 0.0
    skipped: bool = False

    @property
    def pairs_per_s(self) -> float:
        """SFT examples plus preference pairs written per second."""
        return (self.sft + self.preference) / self.seconds if self.seconds > 0 else 0.0


def _score_identities(scores: dict[str, Path]) -> dict[str, Any]:
    identities = {}
    for name, folder in scores.items():
        state = read_state(folder)
        if not state.get("complete"):
            raise FusemergeError("the scores are not complete: run the score step first", file=folder)
        identities[name] = state["identity"]
    shapes = {
        (i["samples"]["prompts_hash"], i["samples"]["shard_size"], i["n_shards"]) for i in identities.values()
    }
    if len(shapes) > 1:
        raise FusemergeError("the models were sampled from different prompts or shard sizes: sample again")
    return identities


def run_pairs(
    *,
    scores: dict[str, str | Path],
    pivot: str | None,
    folder: str | Path,
    spec: PairsSpec,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> PairsReport:
    """Build `sft.jsonl` and `preference.jsonl` from every model's complete scores.

    Args:
        scores: model name -> its scores folder, the sources in recipe order (and the pivot, if it answered).
        pivot: the pivot's name in `scores`, or None when it did not answer (no `chosen_target` then).
        folder: `<work_dir>/implicit/`, where the two files go.
        spec: the recipe's `implicit.pairs` section.
        progress: a bar over prompts.
        echo: where one-line status messages go.
    """
    folder = Path(folder)
    paths = {name: Path(p) for name, p in scores.items()}
    sources = [name for name in paths if name != pivot]
    if not sources:
        raise FusemergeError("pairs needs the scores of at least one source")
    identities = _score_identities(paths)
    identity = {
        "kind": "pairs",
        "scores": identities,
        "pairs": spec.model_dump(mode="json"),
        "pivot": pivot,
        "sources": sources,
    }
    report = PairsReport(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / STATE_DIR / MANIFEST_NAME
    # No lock: `implicit/` is the pipeline's to lock; two writers would each publish a complete file.
    for stale in [*stale_tmp_siblings(folder, SFT_NAME), *stale_tmp_siblings(folder, PREFERENCE_NAME)]:
        remove_path(stale)
    old = _read_json(manifest)
    if (
        old.get("identity") == identity
        and (folder / SFT_NAME).is_file()
        and (folder / PREFERENCE_NAME).is_file()
    ):
        report.skipped = True
        echo(
            f"pairs: {old['stats']['sft']} SFT examples, {old['stats']['preference']} pairs, skipped ({folder})"
        )
        return report
    if old:
        echo("pairs: the scores or the rules changed since the last run, rebuilding")
    first = next(iter(identities.values()))
    n_shards, n_prompts = first["n_shards"], first["samples"]["n_prompts"]
    start = time.perf_counter()
    sft_path, pref_path = folder / SFT_NAME, folder / PREFERENCE_NAME
    sft_tmp, pref_tmp = tmp_sibling(sft_path), tmp_sibling(pref_path)
    dropped: dict[str, int] = defaultdict(int)
    with open(sft_tmp, "w", encoding="utf-8") as sft_fh, open(pref_tmp, "w", encoding="utf-8") as pref_fh:
        with progress_bar(n_prompts, "pairs", enabled=progress, unit="prompt") as pbar:
            for j in range(n_shards):
                grouped: dict[str, dict[str, list[Line]]] = defaultdict(lambda: defaultdict(list))
                for name, path in paths.items():
                    for line in read_jsonl(path / shard_name(j)):
                        grouped[line["prompt_id"]][name].append(line)
                for prompt_id, by_model in grouped.items():
                    report.prompts += 1
                    if in_sft_split(prompt_id, fraction=spec.sft_fraction, seed=spec.seed):
                        example = sft_example([x for name in sources for x in by_model.get(name, [])])
                        if example is None:
                            dropped["sft: no usable response"] += 1
                        else:
                            sft_fh.write(json.dumps(example, ensure_ascii=False) + "\n")
                            report.sft += 1
                    else:
                        pair = preference_pair(by_model, sources=sources, pivot=pivot, spec=spec)
                        if isinstance(pair, str):
                            dropped[f"preference: {pair}"] += 1
                        else:
                            pref_fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
                            report.preference += 1
                pbar.update(len(grouped))
        for fh in (sft_fh, pref_fh):
            fh.flush()
            os.fsync(fh.fileno())
    manifest.unlink(missing_ok=True)  # the files and the manifest change together, or the rerun rebuilds
    publish(sft_tmp, sft_path)
    publish(pref_tmp, pref_path)
    report.seconds = time.perf_counter() - start
    report.dropped = dict(sorted(dropped.items()))
    stats = {
        "prompts": report.prompts,
        "sft": report.sft,
        "preference": report.preference,
        "dropped": report.dropped,
        "pairs_per_s": round(report.pairs_per_s, 1),
    }
    (folder / STATE_DIR).mkdir(exist_ok=True)
    atomic_write_text(manifest, json.dumps({"identity": identity, "stats": stats}, indent=2) + "\n")
    echo(
        f"pairs: {report.sft} SFT examples, {report.preference} preference pairs from {report.prompts} prompts "
        f"in {report.seconds:.2f}s ({report.pairs_per_s:,.0f}/s)"
        + "".join(f"; {n} without ({reason})" for reason, n in report.dropped.items())
    )
    return report


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
