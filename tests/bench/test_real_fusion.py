"""bench/real_fusion.py without its models: data split, the recipes it writes, the JSON line.

The real run (SmolLM2 + Gemma, minutes to an hour) is not part of the suite; these check that the parts
around it are right, so that a long run does not die at its last line or measure the wrong thing.
"""

from __future__ import annotations

import json
import sys

import pytest

from fusemerge.demo.fusion import PAPER, RECOMMENDED
from fusemerge.fuse.recipe import load_fuse_recipe
from tests.bench.scripts import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("real_fusion")


def _rec(domain: str, user: str, answer: str) -> dict:
    return {
        "domain": domain,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
    }


def test_split_is_disjoint_per_domain_deduplicated_and_stable(bench):
    records = [_rec("chat", f"q{i}", f"a{i}") for i in range(10)] + [
        _rec("code", f"c{i}", "x") for i in range(8)
    ]
    records += [_rec("chat", "q3", "a3"), _rec("chat", " q3", "a3 ")]  # repeats (whitespace aside)
    assert len(bench.unique_records(records)) == 18
    fusion, heldout = bench.split_records(records, 5, 3, seed=1)
    assert [sum(r["domain"] == d for r in fusion) for d in ("chat", "code")] == [5, 5]
    assert [sum(r["domain"] == d for r in heldout) for d in ("chat", "code")] == [3, 3]
    key = lambda r: (r["domain"], r["messages"][0]["content"].strip())  # noqa: E731
    assert not {key(r) for r in fusion} & {key(r) for r in heldout}
    assert len({key(r) for r in fusion + heldout}) == 16
    assert bench.split_records(records, 5, 3, seed=1) == (fusion, heldout)
    assert bench.split_records(records, 5, 3, seed=2) != (fusion, heldout)


def test_split_refuses_a_size_the_data_cannot_fill(bench):
    records = [_rec("code", f"c{i}", "x") for i in range(4)]
    with pytest.raises(SystemExit, match="'code' has 4 unique records, the size needs 5"):
        bench.split_records(records, 3, 2)


def test_real_records_are_chat_records_of_both_domains(bench):
    for name, size in bench.SIZES.items():  # every size fits the real data
        records = bench.real_records(code_chars=size["code_chars"])
        assert {r["domain"] for r in records} == set(bench.DOMAINS)
        for r in records:
            roles = [m["role"] for m in r["messages"]]
            assert (
                roles[0] == "user" and roles[-1] == "assistant" and all(m["content"] for m in r["messages"])
            )
        assert (
            max(len(r["messages"][1]["content"]) for r in records if r["domain"] == "code")
            <= size["code_chars"]
        )
        fusion, heldout = bench.split_records(records, size["fusion"], size["heldout"])
        assert len(fusion) == 2 * size["fusion"] and len(heldout) == 2 * size["heldout"], name


@pytest.mark.parametrize("size", ["smoke", "small", "large"])
def test_recipes_validate_and_differ_only_in_fusion(bench, tmp_path, size):
    pivot, source, data = tmp_path / "smollm2-135m-instruct", tmp_path / "gemma-3-270m", tmp_path / "d.jsonl"
    device = "cuda" if size == "large" else "cpu"
    fused = bench.write_recipe(
        tmp_path / "fuse.yml",
        bench.recipe(pivot=pivot, source=source, data=data, output=tmp_path / "f", size=size, device=device),
    )
    clm = bench.write_recipe(
        tmp_path / "clm.yml",
        bench.recipe(pivot=pivot, source=None, data=data, output=tmp_path / "c", size=size, device=device),
    )
    f, c = load_fuse_recipe(fused), load_fuse_recipe(clm)
    assert [s.model for s in f.sources] == [str(source)] and not f.fine_tune
    # the demo's recommended setting by default: offsets + prefix, chain spans, MinCE per byte
    assert (f.alignment.tokens, f.alignment.vocab, f.alignment.spans) == tuple(
        RECOMMENDED["alignment"].values()
    )
    assert f.alignment.spans == "chain"
    assert f.fusion.function == "mince" and f.fusion.metric == RECOMMENDED["fusion"]["metric"]
    assert f.fusion.lambda_ == RECOMMENDED["fusion"]["lambda"]
    assert f.fusion.temperature == RECOMMENDED["fusion"]["temperature"]
    assert c.fine_tune and c.sources == []
    assert f.training == c.training and f.dataset == c.dataset and f.pivot == c.pivot
    assert f.dataset.max_length == bench.SIZES[size]["max_length"]
    assert f.teacher.device == device
    (fused_target,), (clm_target,) = bench.target_folders(fused), bench.target_folders(clm)
    assert fused_target == tmp_path / "f" / "smollm2-135m-instruct-gemma-3-270m"
    assert clm_target == tmp_path / "c" / "smollm2-135m-instruct-finetune"


def test_paper_recipe_and_settings_follow_the_demos_paper_setting(bench, tmp_path):
    body = bench.recipe(
        pivot=tmp_path / "p",
        source=tmp_path / "s",
        data=tmp_path / "d.jsonl",
        output=tmp_path / "f",
        size="small",
        device="cpu",
        setting="paper",
    )
    f = load_fuse_recipe(bench.write_recipe(tmp_path / "fuse.yml", body))
    paper = ("dtw", "stats", "exact")
    assert (
        (f.alignment.tokens, f.alignment.vocab, f.alignment.spans)
        == paper
        == tuple(PAPER["alignment"].values())
    )
    assert f.fusion.metric == "ce_per_token" == PAPER["fusion"]["metric"]
    assert f.fusion.lambda_ == PAPER["fusion"]["lambda"]
    # the span rules are written out (the recipe's default where the demo's setting names none)
    assert body["alignment"]["spans"] == f.alignment.spans
    assert bench.settings_summary("paper") == {
        "setting": "paper",
        "alignment": "dtw+stats",
        "spans": f.alignment.spans,
        "fusion": "mince",
        "metric": "ce_per_token",
        "lambda": PAPER["fusion"]["lambda"],
        "temperature": PAPER["fusion"]["temperature"],
    }
    assert bench.settings_summary("recommended")["alignment"] == "offsets+prefix"


def _eval_json(folders: dict[str, str], bpb: dict[str, dict[str, float]]) -> dict:
    results = [
        {"model": folder, "domain": domain, "bits_per_byte": value}
        for folder, role in folders.items()
        for domain, value in bpb[role].items()
    ]
    return {"models": list(folders), "domains": ["chat", "code"], "results": results}


def test_result_line_deltas_and_gap(bench):
    bpb = {
        "pivot": {"chat": 2.0, "code": 1.0, "all": 1.5},
        "source": {"chat": 1.5, "code": 1.2, "all": 1.4},
        "clm": {"chat": 1.8, "code": 0.9, "all": 1.3},
        "fused": {"chat": 1.7, "code": 0.95, "all": 1.29},
    }
    folders = {"/m/p": "pivot", "/m/s": "source", "/m/c": "clm", "/m/f": "fused"}
    assert bench.bits_per_byte(_eval_json(folders, bpb), folders) == bpb
    line = bench.result_line(
        size="smoke",
        device="cpu",
        fusion=[_rec("chat", "a", "b")] * 3 + [_rec("code", "c", "d")],
        heldout=[_rec("code", "e", "f")],
        settings={"lambda": 0.9, "epochs": 2},
        seconds={"teach": 1.234, "train_clm": 4.0, "total": 9.87},
        bpb=bpb,
        tokens=100,
    )
    assert line["conversations"] == {"fusion": {"chat": 3, "code": 1}, "heldout": {"code": 1}}
    assert line["seconds"] == {"teach": 1.2, "train_clm": 4.0, "total": 9.9}
    assert line["pivot_tokens_per_s"] == {"teach": 81.0, "train_clm": 50.0}  # training reads it twice
    assert line["delta"] == {"chat": -0.1, "code": 0.05, "all": -0.01}
    assert line["delta_pct"]["chat"] == pytest.approx(-5.556, abs=1e-3)
    # the source is better than the pivot on chat (gap 0.5) and overall (0.1), not on code: no gap there
    assert line["gap_closed_by_fusion"] == {"chat": 0.2, "all": 0.1}
    assert line["licenses"]["source"].startswith("Gemma Terms of Use")
    json.dumps(line)  # one JSON line


@pytest.mark.parametrize("paper", [False, True])
def test_main_runs_the_cli_stages_in_order_and_prints_one_json_line(
    bench, tmp_path, monkeypatch, capsys, paper
):
    """main() with the models and the `fusemerge` processes replaced: the stage order, the recipes it
    hands each stage, the eval of the four folders, and a stdout that is exactly one JSON line."""
    pivot, source = tmp_path / "models" / "smollm2-135m-instruct", tmp_path / "models" / "gemma-3-270m"
    monkeypatch.setattr(bench, "model_folders", lambda cache: (pivot, source))
    monkeypatch.setattr(
        bench,
        "real_records",
        lambda seed, code_chars: [_rec(d, f"{d}{i}", "x") for d in ("chat", "code") for i in range(9)],
    )
    monkeypatch.setitem(bench.SIZES, "smoke", {**bench.SIZES["smoke"], "fusion": 4, "heldout": 2})
    calls: list[tuple[str, ...]] = []

    def fake_cli(*args: str, stdout: bool = False) -> tuple[float, str]:
        calls.append(args)
        if args[0] != "eval":
            return 1.0, ""
        folders = args[1:5]
        bpb = {f: {"chat": 1.0 + i, "code": 2.0 + i, "all": 1.5 + i} for i, f in enumerate(folders)}
        results = [{"model": f, "domain": d, "bits_per_byte": v} for f in folders for d, v in bpb[f].items()]
        return 2.0, json.dumps({"models": list(folders), "domains": ["chat", "code"], "results": results})

    monkeypatch.setattr(bench, "cli", fake_cli)
    monkeypatch.setattr(bench, "fusion_tokens", lambda recipe_file: 1000)
    out = tmp_path / "run"
    argv = ["real_fusion.py", "--size", "smoke", "--out", str(out)] + (["--paper"] if paper else [])
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert [c[:4] for c in calls[:4]] == [
        ("fuse", str(out / "fuse.yml"), "--steps", "teach"),
        ("fuse", str(out / "fuse.yml"), "--steps", "align"),
        ("fuse", str(out / "fuse.yml"), "--steps", "train"),
        ("fuse", str(out / "clm.yml"), "-q"),
    ]
    assert calls[4][0] == "eval" and calls[4][1:3] == (str(pivot), str(source))
    assert calls[4][calls[4].index("--data") + 1] == str(out / "data" / "heldout.jsonl")
    assert record["conversations"] == {"fusion": {"chat": 4, "code": 4}, "heldout": {"chat": 2, "code": 2}}
    assert record["bits_per_byte"]["fused"] == {"chat": 4.0, "code": 5.0, "all": 4.5}
    assert record["delta"] == {"chat": 1.0, "code": 1.0, "all": 1.0}
    assert record["fusion_pivot_tokens"] == 1000 and record["pivot_tokens_per_s"]["train_fused"] == 1000.0
    assert set(record["seconds"]) == {"models", "teach", "align", "train_fused", "train_clm", "eval", "total"}
    heldout = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    fusion = [json.loads(line) for line in (out / "data" / "fusion.jsonl").read_text().splitlines()]
    assert len(heldout) == 4 and len(fusion) == 8
    setting = "paper" if paper else "recommended"
    assert record["settings"]["setting"] == setting
    assert record["settings"]["metric"] == ("ce_per_token" if paper else "ce_per_byte")
    written = load_fuse_recipe(out / "fuse.yml")
    assert written.alignment.tokens == ("dtw" if paper else "offsets")
    assert record["settings"]["spans"] == written.alignment.spans
