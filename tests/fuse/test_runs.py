"""Runs that live side by side (issue 19): what a target keeps of its training when saved, the CLM-only
baseline as a run of its own, runs sharing one work_dir, the disk a run leaves, and the small things a
real run showed (warm-up, log lines, file modes).

One module fixture builds a bfloat16 pivot (GPT-2 tokenizer, ChatML text) and runs, in one work_dir:
A (lambda 0.5, two sources) with `--baseline`, then B (lambda 0.9) into another output; and apart, C: a
fine-tune recipe with no sources at all that keeps its checkpoints. The tests read what they left.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fusemerge.cli import main
from fusemerge.errors import FusemergeError
from fusemerge.fuse.pipeline import run_fuse
from fusemerge.fuse.recipe import load_fuse_recipe
from fusemerge.offline.assets import build_random_model

PIVOT = "bf16-pivot"
TRAINING = {
    "mode": "full",
    "dtype": "float32",
    "learning_rate": 1e-5,  # small: a bfloat16 rounding would erase most of it
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.3,  # 2 steps: one warm-up step, which must not run at learning rate 0
    "batch_size": 2,
    "gradient_accumulation": 1,
    "max_steps": 2,
    "save_steps": 1,
    "logging_steps": 1,
}


def _mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, gpt2_tokenizer, chat_jsonl, fuse_helpers):
    root = tmp_path_factory.mktemp("runs")
    pivot = build_random_model(
        root / PIVOT, vocab_size=len(gpt2_tokenizer), tokenizer=gpt2_tokenizer, seed=5, dtype="bfloat16"
    )
    common = {
        "pivot": str(pivot),
        "sources": [str(tiny_models["mistral"]), str(tiny_models["qwen"])],
        "dataset": {"path": str(chat_jsonl), "limit": 8},
        "chat_template": "chatml",
        "teacher": {"shard_size": 8, "device": "cpu"},
        "alignment": {"tokens": "offsets", "vocab": "exact"},
        "training": TRAINING,
        "work_dir": str(root / "work"),
    }
    recipes = {
        "a": fuse_helpers.write_recipe(
            root / "a.yml", **common, fusion={"lambda": 0.5}, output=str(root / "out-a")
        ),
        "b": fuse_helpers.write_recipe(
            root / "b.yml", **common, fusion={"lambda": 0.9}, output=str(root / "out-b")
        ),
        "c": fuse_helpers.write_recipe(
            root / "c.yml",
            pivot=str(pivot),
            dataset=common["dataset"],
            chat_template="chatml",
            fusion={"function": "none"},
            training={**TRAINING, "keep_checkpoints": True},
            output=str(root / "out-c"),
        ),
    }
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result_a = CliRunner().invoke(main, ["fuse", str(recipes["a"]), "--baseline", "-q"])
        lines_b: list[str] = []
        error_b = None
        try:
            run_fuse(recipes["b"], progress=False, echo=lines_b.append)
        except FusemergeError as exc:
            error_b = exc
        lines_c: list[str] = []
        error_c = None
        try:
            run_fuse(recipes["c"], progress=False, echo=lines_c.append)
        except FusemergeError as exc:
            error_c = exc
    return {
        "root": root,
        "pivot": pivot,
        "recipes": recipes,
        "common": common,
        "a": result_a,
        "b": (lines_b, error_b),
        "c": (lines_c, error_c),
        "stdout": stdout.getvalue(),
    }


def _ok(runs, name):
    if name == "a":
        result = runs["a"]
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result.output.splitlines()
    lines, error = runs[name]
    assert error is None, f"{error}\n" + "\n".join(lines)
    return lines


def test_a_fine_tune_needs_no_sources_and_no_stores_and_is_carded_as_one(runs):
    lines = _ok(runs, "c")
    target = runs["root"] / "out-c" / f"{PIVOT}-finetune"
    assert (target / "model.safetensors").is_file(), lines
    assert not (runs["root"] / "out-c" / "work" / "teacher").exists()  # no teacher pass at all
    card = (target / "README.md").read_text()
    assert "fine-tune" in card.lower() and "source:" not in card and "towards the token" not in card
    said = "\n".join(lines)
    assert "fine-tune" in said and "fusion mince" not in said


def test_the_baseline_runs_beside_the_fused_targets_from_one_recipe(runs):
    lines = _ok(runs, "a")
    out = runs["root"] / "out-a"
    for name in (f"{PIVOT}-mistral-source", f"{PIVOT}-qwen-pivot", f"{PIVOT}-finetune"):
        assert (out / name / "model.safetensors").is_file(), (name, lines)
    card = (out / f"{PIVOT}-finetune" / "README.md").read_text()
    assert "fine-tune" in card.lower() and "source:" not in card
    fused_card = (out / f"{PIVOT}-mistral-source" / "README.md").read_text()
    assert "source: `" in fused_card
    merge = (out / "merge.yml").read_text()
    assert "finetune" not in merge  # the baseline is no input of the merge


def test_two_recipes_with_different_lambda_share_one_teacher_pass(runs):
    _ok(runs, "a")
    lines = _ok(runs, "b")
    teach = [line for line in lines if line.startswith("teach ")]
    assert len(teach) == 3 and all("skipped" in line for line in teach), lines
    assert all("skipped" in line for line in lines if line.startswith("align "))
    assert (runs["root"] / "out-b" / f"{PIVOT}-mistral-source" / "model.safetensors").is_file()
    a = load_file(runs["root"] / "out-a" / f"{PIVOT}-mistral-source" / "model.safetensors")
    b = load_file(runs["root"] / "out-b" / f"{PIVOT}-mistral-source" / "model.safetensors")
    assert any(not torch.equal(a[n], b[n]) for n in a)  # lambda 0.5 and 0.9: two trainings


def test_a_refusal_names_the_other_run_and_never_advises_deleting_it(runs, fuse_helpers):
    _ok(runs, "a")
    clash = fuse_helpers.write_recipe(
        runs["root"] / "clash.yml",
        **runs["common"],
        fusion={"lambda": 0.7},
        output=str(runs["root"] / "out-a"),  # A's output: its targets are another run's
    )
    with pytest.raises(FusemergeError) as info:
        run_fuse(clash, steps=["train"], progress=False, echo=lambda _: None)
    message = str(info.value)
    assert "delete" not in message and "lambda" in message, message


def test_checkpoints_are_removed_after_the_save_unless_kept(runs):
    for name in ("a", "b"):
        lines = _ok(runs, name)
        assert lines[-1].startswith("disk:"), lines[-3:]
        assert str(runs["root"] / f"out-{name}") in lines[-1]
    assert not list((runs["root"] / "work" / "train").glob("*/checkpoint-*"))
    lines = _ok(runs, "c")
    assert lines[-1].startswith("disk:") and "checkpoint" in lines[-1], lines[-3:]
    assert len(list((runs["root"] / "out-c" / "work" / "train").glob("*/checkpoint-2"))) == 1


def test_the_default_save_keeps_the_float32_update(runs):
    lines = _ok(runs, "c")
    target = runs["root"] / "out-c" / f"{PIVOT}-finetune"
    (final,) = (runs["root"] / "out-c" / "work" / "train").glob("*/final")
    pivot = load_file(runs["pivot"] / "model.safetensors")
    saved = load_file(target / "model.safetensors")
    trained = load_file(final / "model.safetensors")
    assert next(iter(pivot.values())).dtype == torch.bfloat16
    update = sum(float(((trained[n].float() - pivot[n].float()) ** 2).sum()) for n in pivot) ** 0.5
    error = sum(float(((saved[n].float() - trained[n].float()) ** 2).sum()) for n in pivot) ** 0.5
    assert update > 0 and error / update <= 0.01, error / update  # the stated share (1%)
    said = [line for line in lines if "float32" in line and "bfloat16" in line and "%" in line]
    assert said, lines  # one line: what was chosen, why, and the rounded share


def test_the_first_optimizer_step_learns_under_warm_up(runs):
    _ok(runs, "c")
    (state,) = (runs["root"] / "out-c" / "work" / "train").glob("*/checkpoint-2/trainer_state.json")
    first = json.loads(state.read_text())["log_history"][0]
    assert first["step"] == 1 and first["learning_rate"] > 0, first


def test_training_logs_are_lines_not_dicts_of_strings(runs):
    lines = _ok(runs, "c")
    everything = runs["stdout"] + "\n".join(lines) + runs["a"].output
    assert "{'loss'" not in everything, everything[-2000:]
    assert any(line.startswith("step ") and "loss" in line for line in lines), lines


def test_stores_and_saved_weights_have_the_modes_of_other_files(runs):
    _ok(runs, "a")
    want = 0o666 & ~_umask()
    target = runs["root"] / "out-a" / f"{PIVOT}-mistral-source"
    files = [target / "model.safetensors", target / "config.json"]
    files += sorted((runs["root"] / "work" / "teacher").glob("*/*.safetensors"))
    files += sorted((runs["root"] / "work" / "aligned").glob("*/*.safetensors"))
    files += sorted((runs["root"] / "work" / "vocab").glob("*.safetensors"))
    assert len(files) > 5
    assert {f.name: oct(_mode_of(f)) for f in files} == {f.name: oct(want) for f in files}


def test_varm_merges_float32_targets_over_a_bfloat16_pivot(runs, tmp_path):
    _ok(runs, "a")
    merged = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(runs["root"] / "out-a" / "merge.yml"), str(merged), "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    weights = {k: v for f in sorted(merged.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert weights.keys() == load_file(runs["pivot"] / "model.safetensors").keys()
    assert {v.dtype for v in weights.values()} == {torch.float32}  # merge.yml: out_dtype float32
    assert "out_dtype: float32" in (runs["root"] / "out-a" / "merge.yml").read_text()


@pytest.mark.parametrize(
    "sections, where",
    [
        ({"fusion": {"function": "none", "lambda": 0.5}}, "fusion"),
        ({"sources": []}, "sources"),
        ({"training": {"save_dtype": "float8"}}, "training.save_dtype"),
    ],
)
def test_recipe_errors_for_the_new_keys(tmp_path, fuse_helpers, sections, where):
    base = {"pivot": "org/piv", "sources": ["org/src"], "dataset": {"path": "d.jsonl"}, "output": "o"}
    path = fuse_helpers.write_recipe(tmp_path / "r.yml", **{**base, **sections})
    with pytest.raises(FusemergeError) as info:
        load_fuse_recipe(path)
    assert where in str(info.value), str(info.value)


def test_a_fine_tune_recipe_without_sources_validates(tmp_path, fuse_helpers):
    for fusion in ({"function": "none"}, {"lambda": 1}):
        path = fuse_helpers.write_recipe(
            tmp_path / "r.yml", pivot="org/piv", dataset={"path": "d.jsonl"}, fusion=fusion, output="o"
        )
        recipe = load_fuse_recipe(path)
        assert recipe.sources == [] and recipe.training.save_dtype == "auto"
        assert recipe.training.keep_checkpoints is False
