"""`fusemerge fuse RECIPE --dry-run` for both kinds: exit 0 offline, the plan printed, nothing loaded.

Each run is a fresh interpreter (HF_HUB_OFFLINE=1, an empty HF cache, a folder without the data) that
checks afterwards that neither torch nor transformers was imported: a dry run that loaded a tokenizer
or a config would have had to import them. The shipped recipes run the same way, as on a fresh clone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "accelerate", "datasets", "trl", "peft")
SCRIPT = f"""
import json, sys
from fusemerge.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def dry_run(recipe: Path, *extra: str, cwd: Path, cache: Path) -> tuple[dict, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "fuse", str(recipe), "--dry-run", *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    *output, last = proc.stdout.strip().splitlines()
    return json.loads(last), "\n".join(output) + proc.stderr


@pytest.mark.parametrize(
    "name", ["fusechat-3.0.yml", "fusechat-3.0-1gpu.yml", "fusechat-7b.yml", "fusechat-7b-1gpu.yml"]
)
def test_the_shipped_recipes_pass_dry_run_offline_on_a_fresh_clone(name, tmp_path):
    result, output = dry_run(ROOT / "recipes" / name, cwd=tmp_path, cache=tmp_path / "hf-cache")
    assert result == {"code": 0, "loaded": []}, output
    assert "(valid)" in output and "(to download)" in output and "dry run: nothing was loaded" in output
    assert not (tmp_path / "fused").exists()  # nothing written either


def test_the_fusechat_3_plan_lists_the_papers_setup(tmp_path):
    _, output = dry_run(ROOT / "recipes" / "fusechat-3.0.yml", cwd=tmp_path, cache=tmp_path / "c")
    for line in (
        "fusion: implicit",
        "pivot: meta-llama/Llama-3.1-8B-Instruct (to download)",
        "reward model: RLHFlow/ArmoRM-Llama3-8B-v0.1 (to download)",
        "prompts: data/fusechat-3.0-prompts.jsonl (not found)",
        "5 per prompt, code: 8",
        "score: to do (default: reward_model, code: code_tests, math: math_answer)",
        "preference: to do (ln_dpo, beta 10",
    ):
        assert line in output, output


def _cache_model(cache: Path, repo: str) -> None:
    """A Hub model as huggingface_hub lays it out in its cache (refs/main -> snapshots/<commit>/)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")


def test_dry_run_of_an_explicit_recipe_with_local_and_hub_models(tmp_path, tiny_models):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": str(i)}]}) + "\n" for i in range(7))
    )
    cache = tmp_path / "hf-cache"
    _cache_model(cache, "org/cached-source")
    body = {
        "pivot": str(tiny_models["qwen"]),
        "sources": [str(tiny_models["gpt2"]), "org/cached-source", "org/remote-source"],
        "dataset": {"path": str(data), "limit": 5},
        "output": str(tmp_path / "out"),
    }
    recipe = tmp_path / "explicit.yml"
    recipe.write_text(yaml.safe_dump(body))
    pivot_store = tmp_path / "out" / "work" / "teacher" / "qwen-pivot"
    pivot_store.mkdir(parents=True)
    (pivot_store / "manifest.json").write_text("{}")  # a finished teacher store of the pivot
    result, output = dry_run(recipe, "--steps", "align,train", cwd=tmp_path, cache=cache)
    # the pivot and the data are local: its tokenizer counts the tokens (no weights: no safetensors read)
    assert result["code"] == 0 and "accelerate" not in result["loaded"], output
    for line in (
        f"pivot: {tiny_models['qwen']} (local folder)",
        "source2: org/cached-source (in the local HF cache)",
        "source3: org/remote-source (to download)",
        "(7 records, the first 5 used (limit))",
        "teach: 1 of 4 done (top-10 of 4 models) [not requested]",
        "align: to do",
        "merge.yml (the VaRM merge of the targets)",
    ):
        assert line in output, output


def test_dry_run_of_an_implicit_recipe_with_local_models(tmp_path, tiny_models):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": str(i)}]}) + "\n" for i in range(3))
    )
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"messages": []}\n' * 4)
    body = {
        "pivot": str(tiny_models["qwen"]),
        "sources": [str(tiny_models["gpt2"]), "org/remote-source"],
        "dataset": {"path": str(prompts)},
        "fusion": {"kind": "implicit"},
        "implicit": {
            "sft_data": {"path": str(sft)},
            "sampling": {"include_pivot": False},
            "scoring": {"default": "reward_model", "reward_model": {"model": "org/reward"}},
        },
        "output": str(tmp_path / "out"),
    }
    recipe = tmp_path / "implicit.yml"
    recipe.write_text(yaml.safe_dump(body))
    result, output = dry_run(recipe, cwd=tmp_path, cache=tmp_path / "c")
    assert result == {"code": 0, "loaded": []}, output
    for line in (
        "prompts: ",
        "(3 records)",
        "sample: to do (2 models: gpt2-source, remote-source;",
        f"sft: to do (lora, 3 epochs, lr 5e-06; data: prepared {sft} (4 records))",
        "preference: to do (dpo, beta 0.01, lr 1e-06; data: ",
        "reward model: org/reward (to download)",
        str(tmp_path / "out" / "qwen-pivot-implicit"),
    ):
        assert line in output, output


def test_the_estimate_counts_the_pivots_tokens_and_flops(tmp_path, tiny_models):
    """Tokens as the teach step will count them, FLOPs by fusemerge.fuse.flops, a time and its basis."""
    from fusemerge.fuse.flops import ModelShape, step_flops
    from fusemerge.fuse.pipeline import chat_data
    from fusemerge.fuse.plan import estimate_lines
    from fusemerge.fuse.recipe import load_fuse_recipe
    from fusemerge.lm.tokens import ChatTokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q {i} " * i},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            )
            + "\n"
            for i in range(1, 9)
        )
    )
    body = {
        "pivot": str(tiny_models["qwen"]),
        "sources": [str(tiny_models["gpt2"]), "org/remote-source"],
        "dataset": {"path": str(data)},
        "alignment": {"workers": 3},
        "training": {"mode": "full", "epochs": 2},
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "explicit.yml"
    path.write_text(yaml.safe_dump(body))
    recipe = load_fuse_recipe(path)
    lines = estimate_lines(recipe, ["teach", "align", "train"])
    tokenizer, chat = chat_data(recipe, echo=lambda _: None)
    lengths = [len(ChatTokenizer(tokenizer)(s)[0]) for s in chat.sequences]
    tokens = sum(lengths)
    text = "\n".join(lines)
    assert lines[0].startswith(f"estimate: 8 sequences, {tokens:,} pivot tokens; device: ")
    config = json.loads((tiny_models["qwen"] / "config.json").read_text())
    from types import SimpleNamespace

    shape = ModelShape.from_config(SimpleNamespace(**config))
    teach = step_flops(shape, lengths, "teacher")
    assert f"teach qwen-pivot: {tokens:,} tokens: {teach:.2e} FLOPs" in text
    assert "teach remote-source" in text and "FLOPs unknown (no local config.json)" in text
    assert f"align gpt2-source: {tokens:,} pivot tokens on 3 CPU workers" in text
    assert f"{2 * step_flops(shape, lengths, 'full'):.2e} FLOPs" in text  # 2 epochs, full fine-tune
    assert "assumption" in text or "measured" in text
    assert (
        lines[-1].startswith("  total of the requested steps: ~") and "without the unknown ones" in lines[-1]
    )


def test_the_estimate_says_when_it_cannot_count(tmp_path):
    from fusemerge.fuse.plan import estimate_lines
    from fusemerge.fuse.recipe import load_fuse_recipe

    path = tmp_path / "r.yml"
    path.write_text(
        yaml.safe_dump(
            {"pivot": "org/remote", "sources": ["org/s"], "dataset": {"path": "x.jsonl"}, "output": "o"}
        )
    )
    assert estimate_lines(load_fuse_recipe(path), ["teach"]) == [
        "estimate: cannot count the dataset's tokens (the pivot is not on this disk); the real run counts them"
    ]
