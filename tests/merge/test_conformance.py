"""Conformance: mergekit 0.1.5's own test and example recipes (and model-card ones) through both CLIs.

Each recipe of tests/merge/conformance_cases.py runs through `fusemerge merge` and `mergekit-yaml` (or
`mergekit-moe`) on the same tiny models, every output tensor compared (tests/merge/conformance.py defines
the verdicts and their bounds). The verdict of every recipe is pinned below, so a recipe that starts or
stops working, or whose numbers move past its bound, fails this test; and the README states the count
line this run prints, so the README cannot drift from what was measured.

    python -m tests.merge.conformance     # the same table and count line without pytest
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mergekit")

from tests.merge.conformance import run_suite, summary, table  # noqa: E402
from tests.merge.conformance_cases import CASES  # noqa: E402

# What each recipe gives today; a `fails:` entry is a known gap (see the README's numerics section).
# The random methods cannot be compared element-wise (fusemerge cannot replay mergekit's draws).
EXPECTED = {
    "granite_copy": "equal",
    "granite_linear": "equal",
    "granite_slerp": "equal",
    "gpt2_copy": "equal",
    "gpt2_stack": "mergekit",
    "passthrough_scale": "equal",
    "linear": "equal",
    "slerp": "equal",
    **{
        f"nuslerp_{b}_{r}_{f}": "rounding"
        for b in ("nobase", "c")
        for r in ("rows", "cols")
        for f in ("flat", "noflat")
    },
    "nuslerp_zero_sum": "rounding",
    "task_arithmetic": "rounding",
    "breadcrumbs": "rounding",
    "ties": "rounding",
    "sce": "rounding",
    "ram": "rounding",
    "ramplus_tl": "equal",
    "multislerp": "rounding",
    "dare_ties": "random",
    "model_stock": "rounding",
    "model_stock_filterwise": "rounding",
    "arcee_fusion": "rounding",
    "nearswap": "rounding",
    "della": "random",
    "della_invalid_epsilon": "both-refuse",
    "karcher": "rounding",
    "tok_mismatched_requires_alignment": "both-refuse",
    "tok_source_base": "mergekit",
    "tok_task_arithmetic_base": "mergekit",
    "tok_task_arithmetic_union": "mergekit",
    "tok_source_union": "mergekit",
    "tok_source_model": "mergekit",
    "tok_slerp_union": "mergekit",
    "tok_force_token": "mergekit",
    "tok_configured_tokens_model-with-missing": "mergekit",
    "tok_configured_tokens_base": "mergekit",
    "tok_configured_tokens_union": "mergekit",
    "tok_model_token_id": "mergekit",
    "tok_pad_to_multiple_of": "mergekit",
    "chat_chatml": "equal",
    "chat_literal_jinja": "equal",
    "chat_long_literal_jinja": "equal",
    "chat_llama3": "equal",
    "chat_alpaca": "equal",
    "chat_mistral": "equal",
    "chat_exaone": "equal",
    "example_linear": "equal",
    "example_ties": "rounding",
    "example_bio_merge": "rounding",
    # mergekit ignores the unknown key `pattern` (so its first value applies to every tensor); fusemerge
    # refuses unknown keys by design.
    "example_gradient_slerp": "fails:fusemerge-refuses",
    "example_orcamini_platy_stack": "mergekit",
    "example_arcee_fusion": "rounding",
    "card_slerp_filters": "equal",
    "card_slerp_slices": "mergekit",
    "card_ties_base_listed": "rounding",
    "card_dare_ties_int8": "random",
    "card_linear_int8_mask": "equal",
    "card_task_arithmetic_normalize": "equal",
    "card_model_stock": "rounding",
    "card_sce_topk": "rounding",
    "card_same_size_other_tokens": "mergekit",
    "moe_random_gates": "mergekit",
}
README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_case_has_an_expected_verdict():
    assert sorted(EXPECTED) == sorted(c.name for c in CASES)


@pytest.mark.slow
def test_conformance_with_mergekit(tmp_path):
    verdicts = run_suite(tmp_path)
    print(table(verdicts))
    print(summary(verdicts))
    got = {v.name: v.verdict for v in verdicts}
    moved = {name: (EXPECTED[name], got[name]) for name in got if got[name] != EXPECTED[name]}
    assert not moved, "verdicts moved (expected, got):\n" + "\n".join(
        f"  {n}: {e} -> {g}  {next(v.detail for v in verdicts if v.name == n)}" for n, (e, g) in moved.items()
    )
    assert summary(verdicts) in " ".join(README.read_text(encoding="utf-8").split()), (
        "README.md must state this run's count line: " + summary(verdicts)
    )
