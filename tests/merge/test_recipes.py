"""Every merge recipe in recipes/ passes `fusemerge merge --dry-run`, on tiny Mistral stand-ins of its models.

The recipes name the real Hub ids; the stand-ins sit in a fake local Hugging Face cache under those ids,
so the recipes are checked verbatim, offline, by the same resolution path a user's cache takes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fusemerge.cli import main
from fusemerge.offline.assets import build_random_model, perturb_model
from tests.merge.hub_cache import add_to_cache

ROOT = Path(__file__).resolve().parents[2]
# Merge recipes (mergekit YAML); the fuse recipes in the same folder are checked in tests/fuse.
RECIPES = sorted(
    p for p in (ROOT / "recipes").glob("*.yml") if "merge_method" in yaml.safe_load(p.read_text())
)
IDS = ("openchat/openchat_3.5", "FuseAI/OpenChat-3.5-7B-Mixtral", "FuseAI/OpenChat-3.5-7B-Solar")


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standins")
    pivot = build_random_model(root / "pivot", architecture="mistral", vocab_size=1000, dtype="bfloat16")
    cache = root / "hub"
    add_to_cache(cache, IDS[0], pivot)
    for i, repo_id in enumerate(IDS[1:], start=1):
        add_to_cache(cache, repo_id, perturb_model(pivot, root / f"target{i}", scale=0.002, seed=i))
    return cache


@pytest.fixture()
def offline_cache(fake_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return fake_hub


def test_the_paper_merges_are_all_there():
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in RECIPES}
    assert methods == {"linear", "task_arithmetic", "ties", "dare_ties", "slerp", "sce", "variation_ratio"}
    dare = yaml.safe_load((ROOT / "recipes" / "fusechat_dare_ties.yml").read_text())
    assert all(m["parameters"]["density"] == 0.5 for m in dare["models"])
    for path in RECIPES:
        recipe = yaml.safe_load(path.read_text())
        refs = {recipe.get("base_model")} | {m["model"] for m in recipe["models"]}
        assert refs - {None} <= set(IDS), path.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_run_on_standins(recipe, offline_cache, tmp_path):
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    method = yaml.safe_load(recipe.read_text())["merge_method"]
    assert "engine: streaming" in result.output
    assert f"method:         {method}" in result.output
    assert "tensors:        21\n" in result.output  # 2 layers x 9 + embedding, norm, head
    assert not (tmp_path / "out").exists()


def test_hub_ids_resolve_through_the_cache_named_by_the_environment(fake_hub, tmp_path):
    """End to end, as a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE=1 in the environment."""
    env = {**os.environ, "HF_HUB_CACHE": str(fake_hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    recipe = ROOT / "recipes" / "fusechat_variation_ratio.yml"
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "fusemerge.cli", "merge", str(recipe), str(out), "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file()

    missing = recipe.read_text().replace("FuseAI/OpenChat-3.5-7B-Solar", "FuseAI/not-in-the-cache")
    (tmp_path / "missing.yml").write_text(missing)
    cmd[4:6] = [str(tmp_path / "missing.yml"), str(tmp_path / "other")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "hf download FuseAI/not-in-the-cache" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
