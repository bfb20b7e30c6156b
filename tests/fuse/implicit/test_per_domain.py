"""`implicit.targets: per_domain`: one implicit target per domain, from one sample/score/pairs, and merge.yml.

The recipe keys and their errors, the dry-run plan, the Hub ids, and a whole run on tiny models: two
domains give two SFT and two preference targets (each trained on its own domain's records), a merge.yml
that `fusemerge merge` runs, and a rerun that skips every finished target.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from implicit_helpers import write_jsonl

from fusemerge.checkpoint.layout import TARGET_STAMP
from fusemerge.errors import FusemergeError
from fusemerge.fuse.cli import fuse
from fusemerge.fuse.pipeline import run_fuse
from fusemerge.fuse.recipe import load_fuse_recipe

RECIPE = """\
pivot: org/pivot-8b
sources: [org/source-a]
dataset: {path: prompts.jsonl}
fusion: {kind: implicit}
implicit:
  scoring:
    default: reward_model
    reward_model: {model: org/reward-model}
  targets: per_domain
  domains: [math, code]
output: out/
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> FusemergeError:
    with pytest.raises(FusemergeError) as info:
        load_fuse_recipe(path)
    return info.value


@pytest.mark.parametrize(
    ("change", "line", "key", "words"),
    [
        (("  domains: [math, code]\n", "  domains: [math]\n"), 10, "implicit.domains", "name two or more"),
        (("  domains: [math, code]\n", "  domains: [math, math]\n"), 10, "implicit.domains", "got 1: math"),
        (("  domains: [math, code]\n", ""), 5, "implicit.domains", "got none"),
        (("  targets: per_domain\n", ""), 9, "implicit.domains", "only for implicit.targets: per_domain"),
        (
            ("  domains: [math, code]\n", "  domains: [a b, a-b]\n"),
            10,
            "implicit.domains",
            "same target folder",
        ),
        (("targets: per_domain", "targets: each"), 9, "implicit.targets", "'one' or 'per_domain'"),
    ],
)
def test_bad_per_domain_recipes_name_file_line_and_key(tmp_path, change, line, key, words):
    error = _error(_write(tmp_path, RECIPE.replace(*change)))
    text = str(error)
    assert error.key == key and error.line == line, text
    assert text.startswith(f"{tmp_path / 'recipe.yml'}:{line}, key '{key}'") and words in text, text


def test_the_plan_names_each_domains_targets_and_the_merge(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(fuse, [str(_write(tmp_path, RECIPE)), "--dry-run"])
    assert result.exit_code == 0, result.output
    outputs = result.output.split("outputs:\n", 1)[1].splitlines()[:5]
    assert outputs == [
        "  out/pivot-8b-implicit-sft-math (sft, domain math)",
        "  out/pivot-8b-implicit-math (preference, domain math)",
        "  out/pivot-8b-implicit-sft-code (sft, domain code)",
        "  out/pivot-8b-implicit-code (preference, domain code)",
        "  out/merge.yml (the VaRM merge of the domains' targets)",
    ], result.output
    assert "one target per domain: math, code" in result.output


def test_each_domains_final_target_is_pushed_to_its_own_repo(tmp_path, monkeypatch):
    from fusemerge.fuse.implicit.pipeline import implicit_repo_ids

    monkeypatch.chdir(tmp_path)
    recipe = load_fuse_recipe(_write(tmp_path, RECIPE))
    assert implicit_repo_ids(recipe, "me/Fused") == {
        Path("out/pivot-8b-implicit-math"): "me/Fused-math",
        Path("out/pivot-8b-implicit-code"): "me/Fused-code",
    }
    assert list(implicit_repo_ids(recipe, "me/").values()) == [
        "me/pivot-8b-implicit-math",
        "me/pivot-8b-implicit-code",
    ]


def test_one_target_keeps_its_names_and_its_train_key(tmp_path):
    """`targets` and `domains` are not part of the train key: a one-target run's checkpoints still resume."""
    from fusemerge.fuse.workdir import FuseWorkDir

    one = FuseWorkDir(
        load_fuse_recipe(
            _write(tmp_path, RECIPE.replace("  targets: per_domain\n  domains: [math, code]\n", ""))
        )
    )
    per = FuseWorkDir(load_fuse_recipe(_write(tmp_path, RECIPE, "per.yml")))
    assert one.implicit_domains == [None]
    assert [t.name for t in one.implicit_final_targets] == ["pivot-8b-implicit"]
    sft_one, sft_math = one.implicit_targets()["sft"], per.implicit_targets("math")["sft"]
    assert one.train_key(sft_one) == per.train_key(sft_math)
    assert one.checkpoints(sft_one) != per.checkpoints(sft_math)  # the folder is the target's own


# -- data that does not fit the domains --------------------------------------------------------------------
def _prepared_recipe(tmp_path: Path, chat_models, sft_records: list[dict]) -> Path:
    write_jsonl(tmp_path / "sft.jsonl", sft_records)
    body = {
        "pivot": str(chat_models["pivot"]),
        "sources": ["org/source-a"],
        "fusion": {"kind": "implicit"},
        "implicit": {
            "sft_data": {"path": str(tmp_path / "sft.jsonl")},
            "stages": ["sft"],
            "targets": "per_domain",
            "domains": ["math", "code"],
        },
        "training": {"mode": "full", "max_steps": 1, "batch_size": 2, "gradient_accumulation": 1},
        "output": str(tmp_path / "out"),
    }
    return _write(tmp_path, yaml.safe_dump(body, sort_keys=False), "prepared.yml")


def _sft(domain: str | None, i: int = 0) -> dict:
    record: dict = {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }
    if domain is not None:
        record["domain"] = domain
    return record


@pytest.mark.parametrize(
    ("records", "line", "words"),
    [
        ([_sft("math"), _sft("code"), _sft("chinese")], 3, "domain 'chinese' is not among implicit.domains"),
        ([_sft("math"), _sft(None), _sft("code")], 2, "no 'domain' (a string)"),
        ([_sft("math"), _sft("math", 1)], None, "no sft records of domain 'code'"),
    ],
)
def test_records_outside_the_domains_stop_before_any_training(tmp_path, chat_models, records, line, words):
    recipe = _prepared_recipe(tmp_path, chat_models, records)
    with pytest.raises(FusemergeError) as info:
        run_fuse(recipe, progress=False, echo=lambda _: None)
    assert words in str(info.value) and info.value.line == line, str(info.value)
    assert str(info.value).startswith(str(tmp_path / "sft.jsonl"))
    assert not (tmp_path / "out" / "pivot-implicit-sft-math").exists()  # nothing trained


# -- a whole run on tiny models ------------------------------------------------------------------------------
@pytest.fixture()
def per_domain_recipe(tmp_path, chat_models, reward_model_dir) -> Path:
    prompts = [
        {
            "messages": [{"role": "user", "content": f"{'Add' if i % 2 else 'Code'} something for {i}."}],
            "domain": "math" if i % 2 else "code",
        }
        for i in range(12)
    ]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    body = {
        "pivot": str(chat_models["pivot"]),
        "sources": [str(chat_models["qwen"])],
        "dataset": {"path": str(tmp_path / "prompts.jsonl")},
        "fusion": {"kind": "implicit"},
        "implicit": {
            "sampling": {
                "samples": 2,
                "max_new_tokens": 4,
                "temperature": 1.0,
                "batch_size": 6,
                "shard_size": 6,
                "include_pivot": False,
            },
            "scoring": {"default": "reward_model", "reward_model": {"model": str(reward_model_dir)}},
            "pairs": {"sft_fraction": 0.5},
            "preference": {
                "loss": "dpo",
                "beta": 0.5,
                "learning_rate": 5e-3,
                "max_steps": 1,
                "max_length": 64,
            },
            "targets": "per_domain",
            "domains": ["math", "code"],
        },
        "training": {
            "mode": "full",
            "learning_rate": 5e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "batch_size": 2,
            "gradient_accumulation": 1,
            "max_steps": 1,
            "save_steps": 1,
            "logging_steps": 1,
            "seed": 7,
        },
        "output": str(tmp_path / "out"),
    }
    return _write(tmp_path, yaml.safe_dump(body, sort_keys=False), "per-domain.yml")


@pytest.mark.slow
def test_two_domains_train_two_targets_merged_by_merge_yml_and_a_rerun_skips_them(
    per_domain_recipe, tmp_path, chat_models
):
    from fusemerge.cli import main

    runner = CliRunner()
    out, work = tmp_path / "out", tmp_path / "out" / "work" / "implicit"
    first = runner.invoke(fuse, [str(per_domain_recipe), "--steps", "sample,score,pairs,sft", "-q"])
    assert first.exit_code == 0, first.output
    sft = {d: out / f"pivot-implicit-sft-{d}" for d in ("math", "code")}
    assert all((t / TARGET_STAMP).is_file() for t in sft.values())
    assert not (out / "merge.yml").exists()  # the preference targets are the ones merged
    # each domain's target learned from its own records of the one sft.jsonl
    lines = [json.loads(line) for line in (work / "sft.jsonl").read_text().splitlines()]
    counts = {d: sum(1 for line in lines if line["domain"] == d) for d in ("math", "code")}
    assert all(counts.values()), counts
    for domain, target in sft.items():
        assert "domain " + domain in (target / "README.md").read_text()
    stamps = {d: json.loads((t / TARGET_STAMP).read_text())["data"] for d, t in sft.items()}
    assert stamps["math"] != stamps["code"]

    second = runner.invoke(fuse, [str(per_domain_recipe), "-q"])
    assert second.exit_code == 0, second.output
    skipped = [line.split(":")[0] for line in second.output.splitlines() if "skipped" in line]
    assert skipped == [
        "sample qwen-source",
        "score qwen-source",
        "pairs",
        "sft pivot-implicit-sft-math",
        "sft pivot-implicit-sft-code",
    ], second.output
    final = {d: out / f"pivot-implicit-{d}" for d in ("math", "code")}
    for domain, target in final.items():
        stamp = json.loads((target / TARGET_STAMP).read_text())
        assert stamp["policy"]["data"] == stamps[domain]  # trained from its own domain's SFT target
    merge = yaml.safe_load((out / "merge.yml").read_text())
    assert merge["merge_method"] == "variation_ratio" and merge["base_model"] == str(chat_models["pivot"])
    assert [m["model"] for m in merge["models"]] == [str(final["math"]), str(final["code"])]
    assert f"next: fusemerge merge {out / 'merge.yml'}" in second.output

    merged = runner.invoke(main, ["merge", str(out / "merge.yml"), str(out / "pivot-varm"), "-q"])
    assert merged.exit_code == 0, merged.output
    assert (out / "pivot-varm" / "model.safetensors.index.json").is_file()

    written = {t: (t / TARGET_STAMP).stat().st_mtime_ns for t in [*sft.values(), *final.values()]}
    again = runner.invoke(fuse, [str(per_domain_recipe), "-q"])
    assert again.exit_code == 0, again.output
    assert [line.split(":")[0] for line in again.output.splitlines() if "skipped" in line][-4:] == [
        "sft pivot-implicit-sft-math",
        "preference pivot-implicit-math",
        "sft pivot-implicit-sft-code",
        "preference pivot-implicit-code",
    ], again.output
    assert written == {t: (t / TARGET_STAMP).stat().st_mtime_ns for t in written}


def test_a_later_stages_missing_domain_stops_the_sft_step_before_it_trains(tmp_path, chat_models):
    from train_helpers import preference_rows

    recipe = _prepared_recipe(tmp_path, chat_models, [_sft("math"), _sft("code", 1)])
    body = yaml.safe_load(recipe.read_text())
    pairs = [{**row, "domain": "math"} for row in preference_rows(2)]  # no pair of domain code
    write_jsonl(tmp_path / "dpo.jsonl", pairs)
    body["implicit"] |= {
        "stages": ["sft", "preference"],
        "preference_data": {"path": str(tmp_path / "dpo.jsonl")},
    }
    recipe.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    with pytest.raises(FusemergeError, match="no preference records of domain 'code'") as info:
        run_fuse(recipe, steps=["sft"], progress=False, echo=lambda _: None)
    assert info.value.key == "implicit.domains" and str(info.value).startswith(str(tmp_path / "dpo.jsonl"))
    assert not (tmp_path / "out" / "pivot-implicit-sft-math").exists()
