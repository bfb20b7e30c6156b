"""The pair rules on hand-made scores, the pairs step's files, and sample -> score -> pairs on tiny models."""

from __future__ import annotations

import json

import pytest
from implicit_helpers import math_prompts, write_jsonl

from fusemerge.checkpoint.layout import write_state
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.pairs import (
    PREFERENCE_NAME,
    SFT_NAME,
    candidate_pair,
    in_sft_split,
    preference_pair,
    run_pairs,
    sft_example,
)
from fusemerge.fuse.implicit.prompts import read_prompts
from fusemerge.fuse.implicit.sample import SampleModel, run_sample, shard_name
from fusemerge.fuse.implicit.sample import write_jsonl as write_stage
from fusemerge.fuse.implicit.score import run_score
from fusemerge.fuse.implicit.scorers import ScorerContext
from fusemerge.fuse.implicit.spec import PairsSpec, RewardModelSpec, SamplingSpec, ScoringSpec

QUIET = {"progress": False, "echo": lambda _: None}
PROMPT = [{"role": "user", "content": "Say something."}]


def line(model, k, score, *, pid="p1", passed=None, tie=None, domain="general"):
    return {
        "prompt_id": pid,
        "domain": domain,
        "prompt": PROMPT,
        "model": model,
        "sample_index": k,
        "response": f"{model}-{pid}-{k}",
        "finish_reason": "stop",
        "score": score,
        "scorer": "reward_model" if passed is None else "math_answer",
        "passed": passed,
        "tie_break": tie,
        "detail": "",
    }


def group(lines):
    by_model = {}
    for x in lines:
        by_model.setdefault(x["model"], []).append(x)
    return by_model


# -- the split ----------------------------------------------------------------------------------------------
def test_split_is_seeded_stable_and_near_the_fraction():
    ids = [f"prompt-{i}" for i in range(2000)]
    share = sum(in_sft_split(p, fraction=0.4, seed=42) for p in ids) / len(ids)
    assert 0.37 < share < 0.43
    assert [in_sft_split(p, fraction=0.4, seed=42) for p in ids] == [
        in_sft_split(p, fraction=0.4, seed=42) for p in ids
    ]
    assert [in_sft_split(p, fraction=0.4, seed=1) for p in ids] != [
        in_sft_split(p, fraction=0.4, seed=42) for p in ids
    ]
    assert not any(in_sft_split(p, fraction=0.0, seed=42) for p in ids)
    assert all(in_sft_split(p, fraction=1.0, seed=42) for p in ids)


# -- SFT ------------------------------------------------------------------------------------------------------
def test_sft_takes_the_best_response_of_any_source():
    lines = [line("a", 0, 0.2), line("a", 1, 0.7), line("b", 0, 0.9), line("b", 1, 0.1)]
    example = sft_example(lines)
    assert example["model"] == "b" and example["score"] == 0.9
    assert example["messages"] == [*PROMPT, {"role": "assistant", "content": "b-p1-0"}]
    # equal scores keep the earlier model and sample
    assert sft_example([line("a", 0, 0.5), line("b", 0, 0.5)])["model"] == "a"


def test_sft_in_a_verified_domain_takes_a_correct_answer_ranked_by_the_reward_model():
    lines = [
        line("a", 0, 0.0, passed=False, tie=0.99),
        line("a", 1, 1.0, passed=True, tie=0.3),
        line("b", 0, 1.0, passed=True, tie=0.6),
    ]
    assert sft_example(lines)["model"] == "b"
    assert sft_example([line("a", 0, 0.0, passed=False, tie=0.9)]) is None


# -- preference -------------------------------------------------------------------------------------------------
def test_a_pair_is_the_best_and_worst_of_one_source():
    lines = [
        line("a", 0, 0.90),
        line("a", 1, 0.50),
        line("a", 2, 0.85),
        line("b", 0, 0.95),
        line("b", 1, 0.93),
    ]
    pair = preference_pair(group(lines), sources=["a", "b"], pivot=None, spec=PairsSpec())
    # b has the best chosen response overall, so b gives the pair: its best and its worst
    assert (pair["model"], pair["rejected_model"]) == ("b", "b")
    assert pair["chosen"] == [{"role": "assistant", "content": "b-p1-0"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "b-p1-1"}]
    assert (pair["chosen_score"], pair["rejected_score"]) == (0.95, 0.93)
    assert pair["prompt"] == PROMPT and "chosen_target" not in pair
    # b's gap (0.02) is too small for a 0.05 minimum: a gives it (gap 0.40)
    pair = preference_pair(group(lines), sources=["a", "b"], pivot=None, spec=PairsSpec(min_reward_gap=0.05))
    assert pair["model"] == "a" and pair["chosen_score"] == 0.9 and pair["rejected_score"] == 0.5
    # FuseChat-3.0's window, 0.01 < gap <= 0.1: only b's fits
    window = PairsSpec(min_reward_gap=0.01, max_reward_gap=0.1)
    assert preference_pair(group(lines), sources=["a", "b"], pivot=None, spec=window)["model"] == "b"
    assert candidate_pair(group(lines)["a"], spec=window) == "reward gap too large"
    assert candidate_pair([line("a", 0, 0.5), line("a", 1, 0.5)], spec=PairsSpec()) == "reward gap too small"
    assert candidate_pair([line("a", 0, 0.5)], spec=PairsSpec()) == "fewer than two responses"


def test_without_same_source_the_pair_spans_the_sources():
    lines = [line("a", 0, 0.9), line("a", 1, 0.8), line("b", 0, 0.7), line("b", 1, 0.1)]
    spec = PairsSpec(same_source=False)
    pair = preference_pair(group(lines), sources=["a", "b"], pivot=None, spec=spec)
    assert (pair["model"], pair["rejected_model"], pair["chosen_score"], pair["rejected_score"]) == (
        "a",
        "b",
        0.9,
        0.1,
    )


def test_verified_pairs_need_a_correct_chosen_and_an_incorrect_rejected():
    lines = [
        line("a", 0, 1.0, passed=True, tie=0.40, domain="math"),
        line("a", 1, 1.0, passed=True, tie=0.70, domain="math"),
        line("a", 2, 0.0, passed=False, tie=0.60, domain="math"),
        line("a", 3, 0.0, passed=False, tie=0.20, domain="math"),
    ]
    chosen, rejected = candidate_pair(lines, spec=PairsSpec())
    assert (chosen["sample_index"], rejected["sample_index"]) == (1, 3)
    # the reward gap is the reward model's (the tie-break), not the verdict's
    assert candidate_pair(lines, spec=PairsSpec(max_reward_gap=0.3)) == "reward gap too large"
    everyone_right = [x for x in lines if x["passed"]]
    assert candidate_pair(everyone_right, spec=PairsSpec()) == "no correct and incorrect response"
    # without a reward model there is no gap to check
    bare = [line("a", 0, 1.0, passed=True), line("a", 1, 0.0, passed=False)]
    assert candidate_pair(bare, spec=PairsSpec(min_reward_gap=0.5))[0]["sample_index"] == 0


def test_wrpo_chosen_target_is_the_pivots_best_response():
    lines = [
        line("a", 0, 0.9),
        line("a", 1, 0.2),
        line("pivot", 0, 0.3),
        line("pivot", 1, 0.6),
        line("pivot", 2, 0.95),
    ]
    pair = preference_pair(group(lines), sources=["a"], pivot="pivot", spec=PairsSpec())
    assert pair["model"] == "a"  # the pivot's own answers never become chosen or rejected
    assert pair["chosen_target"] == [{"role": "assistant", "content": "pivot-p1-2"}]
    assert pair["chosen_target_score"] == 0.95


def test_wrpo_chosen_target_in_a_verified_domain_is_a_correct_pivot_answer():
    """Before: the pivot's best-ranked answer became `chosen_target` even when it was wrong."""
    lines = [
        line("a", 0, 1.0, passed=True, domain="math"),
        line("a", 1, 0.0, passed=False, domain="math"),
        line("pivot", 0, 0.0, passed=False, tie=0.9, domain="math"),
        line("pivot", 1, 1.0, passed=True, tie=0.1, domain="math"),
    ]
    pair = preference_pair(group(lines), sources=["a"], pivot="pivot", spec=PairsSpec())
    assert pair["chosen_target"] == [{"role": "assistant", "content": "pivot-p1-1"}]
    wrong = [x for x in lines if not (x["model"] == "pivot" and x["passed"])]
    pair = preference_pair(group(wrong), sources=["a"], pivot="pivot", spec=PairsSpec())
    assert "chosen_target" not in pair and pair["chosen"][0]["content"] == "a-p1-0"


# -- the step's files ----------------------------------------------------------------------------------------------
def write_scores(folder, shards, *, prompts_hash="h"):
    folder.mkdir(parents=True)
    n = sum(len({x["prompt_id"] for x in s}) for s in shards)
    samples = {"prompts_hash": prompts_hash, "shard_size": 2, "n_prompts": n}
    identity = {"samples": samples, "n_shards": len(shards)}
    write_state(folder, {"identity": identity, "complete": True, "n_shards": len(shards)})
    for j, lines in enumerate(shards):
        write_stage(folder / shard_name(j), lines)
    return folder


def test_pairs_step_writes_readable_trl_files_and_skips_or_rebuilds(tmp_path):
    from trl.data_utils import is_conversational

    pids = [f"q{i}" for i in range(40)]
    shards = {"a": [[], []], "b": [[], []], "pivot": [[], []]}
    for i, pid in enumerate(pids):
        j = i * 2 // len(pids)
        for name, base in (("a", 0.5), ("b", 0.4), ("pivot", 0.1)):
            shards[name][j] += [line(name, k, base + 0.1 * k + 0.001 * i, pid=pid) for k in range(3)]
    scores = {name: write_scores(tmp_path / "scores" / name, s) for name, s in shards.items()}
    out = tmp_path / "implicit"
    report = run_pairs(scores=scores, pivot="pivot", folder=out, spec=PairsSpec(sft_fraction=0.4), **QUIET)
    sft = [json.loads(x) for x in (out / SFT_NAME).read_text().splitlines()]
    pref = [json.loads(x) for x in (out / PREFERENCE_NAME).read_text().splitlines()]
    expected_sft = {p for p in pids if in_sft_split(p, fraction=0.4, seed=42)}
    assert {x["prompt_id"] for x in sft} == expected_sft and len(sft) == report.sft
    assert {x["prompt_id"] for x in pref} == set(pids) - expected_sft and len(pref) == report.preference
    assert all(x["model"] == "a" and x["messages"][-1]["content"].startswith("a-") for x in sft)
    for pair in pref:
        assert is_conversational(pair)
        assert pair["model"] == pair["rejected_model"] == "a"
        assert pair["chosen_target"][0]["content"] == f"pivot-{pair['prompt_id']}-2"
    assert report.pairs_per_s > 0 and report.prompts == 40
    before = (out / PREFERENCE_NAME).read_bytes()
    assert run_pairs(
        scores=scores, pivot="pivot", folder=out, spec=PairsSpec(sft_fraction=0.4), **QUIET
    ).skipped
    rebuilt = run_pairs(scores=scores, pivot="pivot", folder=out, spec=PairsSpec(sft_fraction=0.0), **QUIET)
    assert not rebuilt.skipped and rebuilt.sft == 0 and rebuilt.preference == 40
    assert (out / PREFERENCE_NAME).read_bytes() != before
    assert not list(out.glob("*.tmp-*"))


def test_pairs_refuses_incomplete_or_mismatched_scores(tmp_path):
    a = write_scores(tmp_path / "a", [[line("a", 0, 0.5)]])
    b = tmp_path / "b"
    b.mkdir()
    with pytest.raises(FusemergeError, match="not complete"):
        run_pairs(scores={"a": a, "b": b}, pivot=None, folder=tmp_path / "o", spec=PairsSpec(), **QUIET)
    c = write_scores(tmp_path / "c", [[line("c", 0, 0.5)]], prompts_hash="other")
    with pytest.raises(FusemergeError, match="different prompts or shard sizes"):
        run_pairs(scores={"a": a, "c": c}, pivot=None, folder=tmp_path / "o", spec=PairsSpec(), **QUIET)
    with pytest.raises(FusemergeError, match="at least one source"):
        run_pairs(scores={"a": a}, pivot="a", folder=tmp_path / "o", spec=PairsSpec(), **QUIET)


def test_max_reward_gap_must_be_above_the_minimum():
    with pytest.raises(ValueError, match="max_reward_gap must be above min_reward_gap"):
        PairsSpec(min_reward_gap=0.1, max_reward_gap=0.05)


# -- sample -> score -> pairs --------------------------------------------------------------------------------------
def test_sample_score_pairs_on_tiny_models(chat_models, reward_model_dir, tmp_path):
    prompts = read_prompts(path=str(write_jsonl(tmp_path / "p.jsonl", math_prompts(9))))
    spec = SamplingSpec(samples=3, max_new_tokens=5, batch_size=4, shard_size=4)
    scoring = ScoringSpec(reward_model=RewardModelSpec(model=str(reward_model_dir)))  # every domain: the RM
    context = ScorerContext(scoring, progress=False)
    work = tmp_path / "implicit"
    models = [("pivot", "pivot"), ("qwen", "pivot"), ("mistral", "chatml")]
    for name, template in models:
        model = SampleModel(name=name, model=str(chat_models[name]), chat_template=template)
        run_sample(model=model, prompts=prompts, spec=spec, folder=work / "samples" / name, **QUIET)
        run_score(
            name=name,
            samples=work / "samples" / name,
            folder=work / "scores" / name,
            prompts=prompts,
            spec=scoring,
            context=context,
            **QUIET,
        )
    report = run_pairs(
        scores={n: work / "scores" / n for n, _ in models},
        pivot="pivot",
        folder=work,
        spec=PairsSpec(sft_fraction=0.5),
        **QUIET,
    )
    assert report.sft + report.preference + sum(report.dropped.values()) == 9
    assert report.sft > 0 and report.preference > 0
    pref = [json.loads(x) for x in (work / PREFERENCE_NAME).read_text().splitlines()]
    for pair in pref:
        assert pair["model"] in ("qwen", "mistral") and pair["chosen_score"] > pair["rejected_score"]
        assert "chosen_target" in pair
