"""A blank response (a model that answered nothing) never enters the SFT set or a preference pair: the
readers of those files refuse a blank turn, so one such pair stopped the preference stage of a run whose
pairs step had finished (the implicit demo with `pairs.same_source: false`, preference.jsonl line 9)."""

from __future__ import annotations

from test_pairs import group, line

from fusemerge.fuse.implicit import datasets
from fusemerge.fuse.implicit.pairs import candidate_pair, preference_pair, sft_example, target_chosen
from fusemerge.fuse.implicit.spec import PairsSpec


def blank(x: dict) -> dict:
    return {**x, "response": "  \n\n"}


def test_a_blank_response_is_never_the_rejected_one():
    spec = PairsSpec(same_source=False)
    right, wrong = line("s1", 0, 1.0, passed=True), line("s2", 0, 0.0, passed=False)
    empty_wrong = blank(line("s2", 1, 0.0, passed=False))  # ranks last, as the worst answer would
    pair = preference_pair(group([right, wrong, empty_wrong]), sources=["s1", "s2"], pivot=None, spec=spec)
    assert not isinstance(pair, str)
    assert pair["rejected"][0]["content"] == wrong["response"]
    datasets.preference_pair(record=pair, line=1)  # what the preference stage reads back
    assert candidate_pair([right, empty_wrong], spec=spec) == "no correct and incorrect response"


def test_a_blank_response_gives_no_sft_example_and_no_target():
    assert sft_example([blank(line("s1", 0, 1.0, passed=True))]) is None
    assert target_chosen([blank(line("pivot", 0, 1.0, passed=True))]) is None
    lines = [line("s1", 0, 1.0, passed=True), line("s1", 1, 0.0, passed=False)]
    pair = preference_pair(
        group([*lines, blank(line("pivot", 0, 1.0, passed=True))]),
        sources=["s1"],
        pivot="pivot",
        spec=PairsSpec(),
    )
    assert not isinstance(pair, str) and "chosen_target" not in pair
