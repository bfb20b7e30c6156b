"""bench/fusion_ablation.py without training: its settings, the recipes it writes, the table it prints.

The real ablation (the demo's models, minutes per row) is not part of the suite; these check that each row
varies one factor from the demo's own setting and that the recipe it trains is the one the row names.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fusemerge.demo.fusion import PAPER, RECOMMENDED, DemoPlan
from fusemerge.fuse.recipe import load_fuse_recipe
from tests.bench.scripts import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("fusion_ablation")


def test_bases_are_the_demos_settings(bench):
    demo = bench.setting("demo")
    assert demo["alignment"] == "+".join(RECOMMENDED["alignment"][k] for k in ("tokens", "vocab"))
    assert (
        demo["metric"] == RECOMMENDED["fusion"]["metric"]
        and demo["lambda"] == RECOMMENDED["fusion"]["lambda"]
    )
    assert demo["spans"] == "chain" and demo["function"] == "mince"  # the recipe's defaults
    paper = bench.setting("paper")
    assert (
        paper["alignment"] == "dtw+stats" and paper["metric"] == PAPER["fusion"]["metric"] == "ce_per_token"
    )


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("demo+exact", "spans", "exact"),
        ("demo+mince_token", "function", "mince_token"),
        ("demo+lambda0.7", "lambda", 0.7),
    ],
)
def test_demo_rows_change_one_factor(bench, name, key, value):
    row, demo = bench.setting(name), bench.setting("demo")
    assert {k for k in demo if row[k] != demo[k]} == {key} and row[key] == value


def test_recipe_body_trains_what_the_row_names(bench, tmp_path):
    corpus = SimpleNamespace(fusion_file=tmp_path / "fusion.jsonl")
    specialists = {"code": tmp_path / "code-specialist", "chat": tmp_path / "chat-specialist"}
    for name in ("demo+exact", "demo+mince_token", "paper"):
        s = bench.setting(name)
        body = bench.recipe_body(
            DemoPlan(), tmp_path / "pivot", specialists, corpus, tmp_path / "w", s, 7, False
        )
        recipe = load_fuse_recipe(
            bench.write_recipe(tmp_path / f"{name}.yml", body | {"output": str(tmp_path)})
        )
        assert f"{recipe.alignment.tokens}+{recipe.alignment.vocab}" == s["alignment"]
        assert recipe.alignment.spans == s["spans"] and recipe.fusion.function == s["function"]
        assert recipe.fusion.metric == s["metric"] and recipe.fusion.lambda_ == s["lambda"]
        assert recipe.training.seed == 7 and recipe.fusion.sources == "pairwise"
    # aligned stores differ by span rules, so each (alignment, spans) pair has its own work dir
    assert bench.work_name(bench.setting("demo")) != bench.work_name(bench.setting("demo+exact"))
    assert bench.work_name(bench.setting("demo")) == bench.work_name(bench.setting("demo+lambda0.7"))


def test_table_mean_spread_and_the_recorded_settings(bench):
    def row(name: str, seed: int, code: float, chat: float, **extra) -> dict:
        return {
            "setting": name,
            "seed": seed,
            **bench.setting(name),
            "code_gain_pct": code,
            "chat_gain_pct": chat,
            "code_bpb": 2.0 + code / 100,
            "chat_bpb": 3.0,
            "clm_code_bpb": 2.0 + seed / 1000,
            "clm_chat_bpb": 3.0,
            **extra,
        }

    rows = [row("demo", 42, -0.2, -0.4), row("demo", 1, -0.4, -0.2), row("demo+mince_token", 42, 1.5, 0.5)]
    lines = bench.table(rows).splitlines()
    assert len(lines) == 2 + 2 + 1  # header, rule, two settings, the baseline
    demo = next(line for line in lines if line.startswith("| demo |"))
    # mean -0.30, sample standard deviation 0.1414
    assert (
        "| mince | 0.9 | ce_per_byte | offsets+prefix | chain | 1 | 2 | -0.30 ± 0.14 | -0.30 ± 0.14 |" in demo
    )
    assert "| demo+mince_token | mince_token |" in lines[3] and "| 1 | +1.50 | +0.50 |" in lines[3]
    assert lines[-1].startswith("| CLM-only (baseline) | none |") and "| 2 |" in lines[-1]
    # a row of the first ablation (no `function`, `spans`: before `chain`), under a name since retired
    old = {k: v for k, v in row("demo", 42, -0.27, -0.28).items() if k not in ("function", "spans")}
    line = bench.table([old | {"setting": "per_byte+offsets"}]).splitlines()[2]
    assert line.startswith(
        "| per_byte+offsets | mince | 0.9 | ce_per_byte | offsets+prefix | exact | 1 | 1 |"
    )


def test_topk_gold_reads_the_row_that_predicts_the_next_token(bench):
    import numpy as np
    import torch

    class Fixed(torch.nn.Module):
        """Logits at position t rank token (t + 1) % 5 first, then t % 5: a top-2 lists both."""

        def forward(self, input_ids):
            t = torch.arange(input_ids.shape[1])
            logits = torch.zeros(1, len(t), 5)
            logits[0, t, (t + 1) % 5] = 2.0
            logits[0, t, t % 5] = 1.0
            return SimpleNamespace(logits=logits)

    ids = np.arange(6) % 5
    rows = np.array([0, 2, 4])
    gold = np.array([1, 2, 3])  # row 0: ranked first; row 2: second; row 4: neither (its top-2: 0, 4)
    hit, p = bench.topk_gold(Fixed(), ids, rows, gold, 1)
    assert hit.tolist() == [True, False, False]
    first = float(np.exp(2.0) / (np.exp(2.0) + np.exp(1.0) + 3))  # softmax of (2, 1, 0, 0, 0)
    assert p == pytest.approx([first, 0.0, 0.0])
    hit, p = bench.topk_gold(Fixed(), ids, rows, gold, 2)
    assert hit.tolist() == [True, True, False]
    assert p == pytest.approx([first, first * np.exp(-1.0), 0.0])


def test_gold_prob_of_a_stored_top_k(bench):
    import numpy as np

    ids = np.array([[3, 5, -1], [1, 2, 4], [7, -1, -1]])
    lp = np.log(np.array([[0.5, 0.25, 1.0], [0.6, 0.3, 0.1], [1.0, 1.0, 1.0]]))
    # row 0: gold 5 in the second slot; row 1: gold 9 not listed; row 2: gold -1 matches no empty slot
    assert bench.gold_prob(ids, lp, np.array([5, 9, -1])) == pytest.approx([0.25, 0.0, 0.0])


def test_with_specialist_changes_one_plan_and_refuses_unknown_fields(bench):
    plan = bench.with_specialist(DemoPlan(), ["code:epochs=9,hidden_size=96"])
    code = dict(plan.specialists)["code"]
    assert code.epochs == 9.0 and code.hidden_size == 96 and isinstance(code.hidden_size, int)
    assert dict(plan.specialists)["chat"] == dict(DemoPlan().specialists)["chat"]
    assert plan.pivot == DemoPlan().pivot and bench.with_specialist(DemoPlan(), []) == DemoPlan()
    with pytest.raises(SystemExit, match="ModelPlan has no \\['width'\\]"):
        bench.with_specialist(DemoPlan(), ["code:width=3"])
    with pytest.raises(SystemExit, match="no 'math' specialist"):
        bench.with_specialist(DemoPlan(), ["math:epochs=2"])
