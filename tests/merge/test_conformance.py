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
EXPECTED = {
    "granite_copy": "equal",
    "granite_linear": "equal",
    "granite_slerp": "equal",
    "gpt2_copy": "equal",
    "gpt2_stack": "mergekit",
    "passthrough_scale": "equal",
    "linear": "equal",
    "slerp": "fails:fusemerge-refuses",
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
    "sce": "fails:fusemerge-refuses",
    "ram": "fails:fusemerge-refuses",
    "ramplus_tl": "fails:fusemerge-refuses",
    "multislerp": "rounding",
    "dare_ties": "random",
    "model_stock": "fails:fusemerge-refuses",
    "model_stock_filterwise": "fails:fusemerge-refuses",
    "arcee_fusion": "fails:fusemerge-refuses",
    "nearswap": "fails:fusemerge-refuses",
    "della": "random",
    "della_invalid_epsilon": "both-refuse",
    "karcher": "fails:fusemerge-refuses",
    "tok_mismatched_requires_alignment": "both-refuse",
    "tok_source_base": "fails:fusemerge-refuses",
    "tok_task_arithmetic_base": "mergekit",
    "tok_task_arithmetic_union": "mergekit",
    "tok_source_union": "mergekit",
    "tok_source_model": "fails:fusemerge-refuses",
    "tok_slerp_union": "fails:fusemerge-refuses",
    "tok_force_token": "mergekit",
    "tok_configured_tokens_model-with-missing": "mergekit",
    "tok_configured_tokens_base": "mergekit",
    "tok_configured_tokens_union": "mergekit",
    "tok_model_token_id": "mergekit",
    "tok_pad_to_multiple_of": "mergekit",
    "chat_chatml": "equal",
    "chat_literal_jinja": "equal",
    "chat_long_literal_jinja": "equal",
    "chat_llama3": "fails:fusemerge-refuses",
    "chat_alpaca": "fails:fusemerge-refuses",
    "chat_mistral": "fails:fusemerge-refuses",
    "chat_exaone": "fails:fusemerge-refuses",
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
    "card_linear_int8_mask": "fails:fusemerge-refuses",
    "card_task_arithmetic_normalize": "equal",
    "card_model_stock": "rounding",
    "card_sce_topk": "fails:fusemerge-refuses",
    "card_same_size_other_tokens": "fails:differs",
    "moe_random_gates": "fails:differs",
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
