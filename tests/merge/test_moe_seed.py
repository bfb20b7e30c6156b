"""mergekit-moe recipes honour `--random-seed`: `gate_mode: random` gates are reproducible, and equal to
`mergekit-moe --random-seed N`'s."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fusemerge.cli import main
from tests.merge.conformance import bpe_tokenizer, load_tensors, picollama

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe")
    folders = []
    for seed, name in enumerate(("base", "expert"), start=50):
        folders.append(picollama(root / name, seed))
        bpe_tokenizer(64, []).save_pretrained(folders[-1])
    path = root / "moe.yml"
    path.write_text(
        f"base_model: {folders[0]}\ngate_mode: random\ndtype: float32\nexperts:\n"
        f"  - source_model: {folders[1]}\n    positive_prompts: [one]\n"
        f"  - source_model: {folders[0]}\n    positive_prompts: [two]\n"
    )
    return path


def gates(folder: Path) -> dict[str, torch.Tensor]:
    return {n: t for n, t in load_tensors(folder).items() if "gate.weight" in n}


def fusemerge(recipe: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(main, ["merge", str(recipe), str(out), "-q", "--random-seed", str(seed)])
    assert result.exit_code == 0, result.output
    return gates(out)


def test_same_seed_same_gates_as_mergekit_moe(recipe, tmp_path):
    from mergekit.scripts.moe import main as mergekit_moe

    first = fusemerge(recipe, tmp_path / "one", 1)
    assert first, "no router gates in the output"
    again = fusemerge(recipe, tmp_path / "two", 1)
    other = fusemerge(recipe, tmp_path / "three", 2)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    result = CliRunner().invoke(
        mergekit_moe, [str(recipe), str(tmp_path / "mk"), "--random-seed", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    theirs = gates(tmp_path / "mk")
    assert set(theirs) == set(first)
    assert all(torch.equal(first[n], theirs[n]) for n in theirs)
