"""`fusemerge demo --implicit`: the task's data, the claims and exit status, a scaled-down run, the full demo.

The scaled-down run goes through every stage (pre-training, sample, score, pairs, sft, DPO, WRPO, the
held-out evaluation, the table, results.json and the PNG) on two-layer models of a few steps. Models that
small answer nothing right, so its pipeline scores with a stand-in verifier registered here (a response
"passes" when its length is even: some pass and some fail, as the pairs need); the evaluation still uses
`math_answer`. Its numbers mean nothing, so only their consistency with the printed verdicts is asserted.
A slow test (CI runs it) runs `fusemerge demo --implicit` itself and asserts its claims and exit status.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from fusemerge.demo.arithmetic import (
    DOMAINS,
    WORDINGS,
    ArithmeticPlan,
    answer_text,
    build_arithmetic,
    fact_text,
    facts,
    gold,
    question,
)
from fusemerge.demo.implicit import ImplicitDemoPlan, run_implicit_demo, source_label
from fusemerge.demo.pretrain import ModelPlan
from fusemerge.demo.report import implicit_check_lines, implicit_claims
from fusemerge.demo.results import PIVOT_LABEL, SFT_LABEL, ImplicitResult, preference_label
from fusemerge.fuse.implicit.scorers import SCORERS, ScoreItem, ScoreResult, final_answer

LOSSES = ("dpo", "wrpo")


@pytest.mark.parametrize("asked", [1, 2])
def test_held_out_prompts_are_facts_the_pipeline_never_asked_in_that_wording(tmp_path, asked):
    plan = ArithmeticPlan(specialist_texts=300, pivot_texts=100, fusion_wordings=asked)
    a = build_arithmetic(tmp_path / "a", plan)
    b = build_arithmetic(tmp_path / "b", plan)
    assert a.fusion_file.read_text() == b.fusion_file.read_text()
    assert a.heldout_file.read_text() == b.heldout_file.read_text()
    fusion = [json.loads(line) for line in a.fusion_file.read_text().splitlines()]
    heldout = [json.loads(line) for line in a.heldout_file.read_text().splitlines()]
    every = {(d, x, y) for d in DOMAINS for x, y in facts(plan.largest)}
    fact = lambda r: (r["domain"], *map(int, r["prompt_id"].split("-")[1:3]))  # noqa: E731
    assert sorted(fact(r) for r in fusion) == sorted(f for f in every for _ in range(asked))
    assert len(heldout) == len(every) * (len(WORDINGS) - asked)
    assert len({r["prompt_id"] for r in fusion}) == len(fusion)  # the SFT/preference split draws per id
    for r in fusion + heldout:  # prompts only, with the gold answer the scorer checks
        assert [m["role"] for m in r["messages"]] == ["user"]
        domain, x, y = r["prompt_id"].split("-")[:3]
        assert r["answer"] == str(gold(domain, int(x), int(y)))
    asked_texts = {r["messages"][0]["content"] for r in fusion}
    assert not asked_texts & {r["messages"][0]["content"] for r in heldout}
    assert not {r["prompt_id"] for r in fusion} & {r["prompt_id"] for r in heldout}
    # the pivot's texts hold its share of each table's facts, the specialists' texts their whole table
    for domain in DOMAINS:
        assert len(a.pivot_facts[domain]) == round(plan.pivot_share * len(facts(plan.largest)))
        pivot_answers = {t.split("Assistant: ")[1].strip() for t in a.texts["pivot"][domain]}
        assert pivot_answers <= {answer_text(domain, x, y) for x, y in a.pivot_facts[domain]}
        answers = {t.split("Assistant: ")[1].strip() for t in a.texts["specialist"][domain]}
        assert answers == {answer_text(domain, x, y) for x, y in facts(plan.largest)}


def test_an_answer_restates_the_fact_in_one_form_whatever_the_wording(tmp_path):
    """Every wording of a fact is answered by the same text, so a fact learnt in one wording is the
    continuation of `7 * 8 =` that the other wordings reach too; the bare form is kept for comparison."""
    for wording in WORDINGS:
        text = fact_text("multiplication", 7, 8, wording)
        assert text.endswith("Assistant: 7 * 8 = 56\n\n")
        assert text.startswith("User: " + question("multiplication", 7, 8, wording))
        assert fact_text("addition", 7, 8, wording, "bare").endswith("Assistant: 15\n\n")
    record = {"messages": [{"role": "assistant", "content": answer_text("addition", 3, 4)}]}
    assert final_answer(record["messages"][0]["content"]) == "7"  # what math_answer reads: the last number
    bare = build_arithmetic(tmp_path / "bare", ArithmeticPlan(answer="bare"))
    restated = build_arithmetic(tmp_path / "restated", ArithmeticPlan())
    assert bare.fusion_file.read_text() == restated.fusion_file.read_text()  # the prompts do not change
    assert bare.pivot_facts == restated.pivot_facts


def _result(pivot: float, sft: float, dpo: float, wrpo: float) -> ImplicitResult:
    """A table with the given average accuracies (both operations equal to it)."""
    rows = {PIVOT_LABEL: pivot, SFT_LABEL: sft, preference_label("dpo"): dpo, preference_label("wrpo"): wrpo}
    return ImplicitResult({k: {**dict.fromkeys(DOMAINS, v), "average": v} for k, v in rows.items()}, {})


def test_claims_are_strict_and_each_line_states_its_numbers():
    assert all(implicit_claims(_result(0.2, 0.5, 0.6, 0.55), LOSSES).values())
    failed = {c for c, held in implicit_claims(_result(0.2, 0.5, 0.5, 0.1), LOSSES).items() if not held}
    assert failed == {"SFT + DPO beats SFT alone", "SFT + WRPO beats the pivot", "SFT + WRPO beats SFT alone"}
    lines = implicit_check_lines(_result(0.2, 0.5, 0.5, 0.1), LOSSES)
    assert lines[0] == "SFT + DPO beats the pivot: yes (50.0% vs 20.0% held-out accuracy, +30.0 points)"
    assert [line.split(": ")[1][:3] for line in lines] == ["yes", "NO ", "NO ", "NO "]


@pytest.mark.parametrize(("dpo", "status"), [(0.6, 0), (0.5, 3)])
def test_demo_implicit_exits_3_when_a_claim_does_not_hold(tmp_path, monkeypatch, dpo, status):
    """The command's exit status, from the verdicts on a given table (the demo's training is not run)."""
    from click.testing import CliRunner

    import fusemerge.demo.implicit
    from fusemerge.cli import main

    seen = {}

    def stand_in(out, plan, *, progress, echo):
        seen["out"] = out
        echo("the demo's table would be here")
        return _result(0.2, 0.5, dpo, 0.55)

    monkeypatch.setattr(fusemerge.demo.implicit, "run_implicit_demo", stand_in)
    result = CliRunner().invoke(main, ["demo", "--implicit", "-q", "--out", str(tmp_path)])
    assert result.exit_code == status, result.output
    assert seen["out"] == tmp_path
    if status:
        assert "claim did not hold: SFT + DPO beats SFT alone" in result.output


@pytest.fixture
def even_length_scorer():
    """A stand-in verifier for models too small to get anything right: an even-length response passes."""

    def score(items: Sequence[ScoreItem], *, context) -> list[ScoreResult]:
        return [ScoreResult(float(len(it.response) % 2 == 0), len(it.response) % 2 == 0) for it in items]

    SCORERS.register("test_even_length")(score)
    yield "test_even_length"
    SCORERS._entries.pop("test_even_length", None)  # type: ignore[attr-defined]


def test_scaled_down_demo_runs_every_stage(tmp_path, even_length_scorer):
    def tiny(name: str, tokenizer: str, arch: str, seed: int) -> ModelPlan:
        return ModelPlan(name, tokenizer, arch, hidden_size=32, intermediate_size=64, block=64, seed=seed)

    base = ImplicitDemoPlan()
    plan = ImplicitDemoPlan(
        data=ArithmeticPlan(largest=3, specialist_texts=40, pivot_texts=20),
        pivot=tiny("pivot", base.pivot.tokenizer, base.pivot.architecture, 1),
        sources=tuple((d, tiny(p.name, p.tokenizer, p.architecture, p.seed)) for d, p in base.sources),
    )
    plan.implicit["scoring"] = {"default": even_length_scorer}
    plan.implicit["sampling"].update(samples=3, max_new_tokens=6)
    plan.implicit["preference"].update(epochs=1, max_length=48)
    plan.training["epochs"] = 1
    lines: list[str] = []
    result = run_implicit_demo(tmp_path / "demo", plan, progress=False, echo=lines.append)

    assert result.labels == [
        PIVOT_LABEL,
        *(source_label(d) for d, _ in plan.sources),
        SFT_LABEL,
        *(preference_label(loss) for loss in plan.losses),
    ]
    for row in result.accuracy.values():
        assert set(row) == {*DOMAINS, "average"} and all(0 <= v <= 1 for v in row.values())
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    for label, row in result.accuracy.items():
        assert saved["accuracy"][label] == pytest.approx(row)
    assert saved["pipeline"]["pairs"]["sft"] > 0 and saved["pipeline"]["pairs"]["preference"] > 0
    assert (tmp_path / "demo" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = "\n".join(lines)
    assert "held-out accuracy" in text
    # Each printed verdict is the comparison of the numbers in the table, whichever way it went here.
    acc = result.accuracy
    for loss in plan.losses:
        label = preference_label(loss)
        for other, name in ((PIVOT_LABEL, "the pivot"), (SFT_LABEL, "SFT alone")):
            verdict = "yes" if acc[label]["average"] > acc[other]["average"] else "NO"
            assert f"{label} beats {name}: {verdict} (" in text
    # The recipes it wrote differ in the preference loss alone.
    import yaml

    dpo, wrpo = (yaml.safe_load((tmp_path / "demo" / f"implicit-{x}.yml").read_text()) for x in LOSSES)
    assert dpo["fusion"] == {"kind": "implicit"}
    assert dpo["implicit"]["preference"].pop("loss") == "dpo"
    assert wrpo["implicit"]["preference"].pop("loss") == "wrpo"
    assert dpo == wrpo

    # A rerun reuses every finished stage and gives the same numbers.
    again: list[str] = []
    second = run_implicit_demo(tmp_path / "demo", plan, progress=False, echo=again.append)
    assert second.accuracy == result.accuracy
    rerun = "\n".join(again)
    assert "training from scratch" not in rerun
    assert "sft sft: target complete, skipped" in rerun
    assert all(f"preference sft-{loss}: target complete, skipped" in rerun for loss in plan.losses)


@pytest.mark.slow
def test_full_demo_shows_what_fusechat3_predicts(tmp_path):
    """Issue 13's acceptance on the defaults, run as users run it: each SFT + preference target beats the
    pivot and the SFT target on the held-out wordings, each source beats the pivot on its own table, and
    the command exits 0 (3 when a claim does not hold)."""
    from click.testing import CliRunner

    from fusemerge.cli import main

    run = CliRunner().invoke(main, ["demo", "--implicit", "-q", "--out", str(tmp_path / "demo")])
    assert run.exit_code == 0, run.output
    accuracy = json.loads((tmp_path / "demo" / "results.json").read_text())["accuracy"]
    pivot, sft = accuracy[PIVOT_LABEL], accuracy[SFT_LABEL]
    for domain in DOMAINS:
        assert accuracy[source_label(domain)][domain] > pivot[domain]
    for loss in LOSSES:
        label = preference_label(loss)
        assert accuracy[label]["average"] > max(pivot["average"], sft["average"]), (label, accuracy[label])
        assert f"{label} beats the pivot: yes" in run.output
        assert f"{label} beats SFT alone: yes" in run.output
