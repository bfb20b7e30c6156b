"""`fusemerge fuse` end to end on tiny models with three real tokenizers, then `fusemerge merge` on the
recipe it writes: teach -> align -> train -> merge on the CPU, every step skipped on a rerun."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fusemerge.cli import main
from tests.launcher import fuse_on_two_processes


def test_fuse_then_merge_on_three_tokenizers(tmp_path, tiny_models, chat_jsonl, fuse_helpers):
    recipe = fuse_helpers.write_recipe(
        tmp_path / "recipe.yml",
        pivot=str(tiny_models["qwen"]),
        sources=[str(tiny_models["mistral"]), str(tiny_models["gpt2"])],
        dataset={"path": str(chat_jsonl), "limit": 12},
        teacher={"shard_size": 8, "device": "cpu"},
        alignment={"tokens": "dtw", "vocab": "stats"},
        # per token: random tiny models have about log(V) nats per token, so per byte the pivot (the coarsest
        # tokenizer) wins every sequence and both targets would be the same self-distillation of the pivot
        fusion={"function": "mince", "lambda": 0.5, "metric": "ce_per_token"},
        training={
            "mode": "full",
            "learning_rate": 1e-3,
            "batch_size": 2,
            "gradient_accumulation": 1,
            "max_steps": 3,
            "save_steps": 2,
        },
        output=str(tmp_path / "fused"),
    )
    runner = CliRunner()
    result = runner.invoke(main, ["fuse", str(recipe), "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    targets = [
        tmp_path / "fused" / "qwen-pivot-mistral-source",
        tmp_path / "fused" / "qwen-pivot-gpt2-source",
    ]
    assert f"targets: {targets[0]}, {targets[1]}" in result.output
    fuse_output = result.output
    command = re.search(r"^next: fusemerge merge (\S+) (\S+)$", result.output, re.M)
    assert command, result.output
    merge_recipe, merged = command.groups()
    text = (tmp_path / "fused" / "merge.yml").read_text()
    assert "merge_method: variation_ratio" in text and f"base_model: {tiny_models['qwen']}" in text

    result = runner.invoke(main, ["merge", merge_recipe, merged, "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)

    pivot = load_file(tiny_models["qwen"] / "model.safetensors")
    for target in targets:
        weights = load_file(target / "model.safetensors")
        assert weights.keys() == pivot.keys()
        changed = [n for n in pivot if not torch.equal(weights[n], pivot[n])]
        assert len(changed) > len(pivot) // 2, f"{target.name}: only {changed} changed"
        card = (target / "README.md").read_text()
        assert "source: `" in card and "pivot (base)" in card
        # which teacher MinCE took, per domain (records without a domain field: "all"), in log and card
        picks = re.search(
            rf"train {target.name}: MinCE picks (all: .* of 12 sequences by ce_per_token)$",
            fuse_output,
            re.M,
        )
        assert picks, fuse_output
        assert "## Teacher per sequence" in card and f"- {picks.group(1)}" in card
    a, b = (load_file(t / "model.safetensors") for t in targets)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # two sources, two different targets
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert (
        model.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny_models["qwen"]).config.vocab_size
    )

    report = runner.invoke(main, ["fuse", str(recipe), "--report", "-q"])
    assert report.exit_code == 0, report.output + repr(report.exception)
    saved = json.loads((tmp_path / "fused" / "work" / "report.json").read_text())
    assert list(saved) == ["gpt2-source", "mistral-source"]
    for name, rows in saved.items():
        (row,) = rows  # one domain: "all"
        assert row["domain"] == "all" and row["sequences"] == 12 and 0 < row["covered"] <= row["positions"]
        assert 0 < row["fusion_share"] < 1 and row["grad_clm"] > 0 and sum(row["picks"].values()) == 12
        assert f"report {name} (MinCE by ce_per_token):" in report.output
    assert report.output.count("with a teacher distribution") == 2

    again = runner.invoke(main, ["fuse", str(recipe), "-q"])
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped") >= 3 + 2 + 2, again.output  # teach x3, align x2, train x2


@pytest.mark.slow
def test_smollm2_pivot_with_a_source_of_another_tokenizer_learns(tmp_path_factory, fuse_helpers):
    """SmolLM2-135M-Instruct (real, GPT-2-style 49k vocabulary) fused with a Qwen3-tokenizer source: a few
    LoRA steps on the CPU give a finite loss that goes down."""
    from fusemerge.fuse.pipeline import run_fuse
    from fusemerge.offline.tiny_fusion import build_tiny_fusion

    root = tmp_path_factory.mktemp("smol-fuse")
    paths = build_tiny_fusion(root, conversations=8)
    recipe = fuse_helpers.write_recipe(
        root / "recipe.yml",
        pivot=str(paths["pivot"]),
        sources=[str(paths["qwen3"])],
        dataset={"path": str(paths["data"]), "max_length": 256},
        teacher={"device": "cpu", "dtype": "float32"},
        fusion={"function": "mince", "lambda": 0.9},
        training={
            "mode": "lora",
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "batch_size": 4,
            "gradient_accumulation": 1,
            "max_steps": 6,
            "logging_steps": 1,
            "save_steps": 6,
            "keep_checkpoints": True,
        },
        output=str(root / "fused"),
    )
    lines: list[str] = []
    folders = run_fuse(recipe, progress=False, echo=lines.append)
    target = folders["target/smollm2-135m-instruct-tiny-qwen3-source"]
    (state_file,) = (root / "fused" / "work" / "train").glob(
        f"{target.name}-*/checkpoint-6/trainer_state.json"
    )
    state = json.loads(state_file.read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    print("SmolLM2 fusion loss per step:", losses)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 and losses[-1] < losses[0]
    assert AutoModelForCausalLM.from_pretrained(target).config.model_type == "llama"


@pytest.mark.slow
def test_train_step_data_parallel_over_two_processes(tmp_path, tiny_models, chat_jsonl, fuse_helpers):
    """Two processes (torch.distributed, gloo on the CPU) train one target without code changes.

    `accelerate launch --multi_gpu` starts its GPU processes with this same launcher (torch.distributed.run);
    `accelerate launch --cpu` starts a single process unless MPI is set up, so the CPU check uses the
    launcher directly. accelerate's PartialState picks the process group up from the environment.
    """

    from fusemerge.fuse.pipeline import run_fuse

    recipe = fuse_helpers.write_recipe(
        tmp_path / "recipe.yml",
        pivot=str(tiny_models["gpt2"]),
        sources=[str(tiny_models["mistral"])],
        dataset={"path": str(chat_jsonl), "limit": 8},
        chat_template="chatml",
        teacher={"shard_size": 8, "device": "cpu"},
        alignment={"tokens": "offsets", "vocab": "exact"},
        training={
            "mode": "lora",
            "batch_size": 2,
            "gradient_accumulation": 1,
            "max_steps": 2,
            "save_steps": 2,
            "keep_checkpoints": True,
        },
        output=str(tmp_path / "fused"),
    )
    run_fuse(recipe, steps=["teach", "align"], progress=False, echo=lambda _: None)
    done = fuse_on_two_processes(recipe, "train")
    target = tmp_path / "fused" / "gpt2-source-mistral-source"
    assert (target / "model.safetensors").is_file() and (target / "fusemerge_target.json").is_file()
    (state_file,) = (tmp_path / "fused" / "work" / "train").glob(
        f"{target.name}-*/checkpoint-2/trainer_state.json"
    )
    state = json.loads(state_file.read_text())
    assert state["global_step"] == 2
    assert "one target, nothing to merge" in done.stdout
    assert done.stdout.count(f"train {target.name}: lora on cpu") == 2, done.stdout  # one line per process
    assert done.stdout.count("one target, nothing to merge") == 1, done.stdout  # the main process reports


def test_target_plan_and_merge_recipe(tmp_path, fuse_helpers):
    from fusemerge.fuse.pipeline import write_merge_recipe
    from fusemerge.fuse.recipe import load_fuse_recipe
    from fusemerge.fuse.workdir import target_plan
    from fusemerge.merge.recipe import load_recipe

    sections = {"pivot": "org/piv", "sources": ["org/s-a", "other/s_b"], "dataset": {"path": "d.jsonl"}}
    path = fuse_helpers.write_recipe(tmp_path / "r.yml", **sections, output=str(tmp_path / "out"))
    recipe = load_fuse_recipe(path)
    assert target_plan(recipe) == [("piv-s-a", [0]), ("piv-s_b", [1])]
    merge = write_merge_recipe(recipe, [tmp_path / "out" / "piv-s-a", tmp_path / "out" / "piv-s_b"])
    loaded = load_recipe(merge)
    assert loaded.recipe.merge_method == "variation_ratio" and loaded.recipe.base_model == "org/piv"
    assert [m.model for m in loaded.recipe.models] == [
        str(tmp_path / "out" / n) for n in ("piv-s-a", "piv-s_b")
    ]
    everything = fuse_helpers.write_recipe(
        tmp_path / "all.yml", **sections, fusion={"sources": "all"}, output=str(tmp_path / "out")
    )
    assert target_plan(load_fuse_recipe(everything)) == [("piv-fused", [0, 1])]
