"""Helpers for fault-injection tests: tiny model families, hostile copies of them, and CLI runs."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusemerge.cli import main
from fusemerge.offline.assets import build_random_model, perturb_model


@pytest.fixture(scope="session")
def small_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    base = build_random_model(root / "base", vocab_size=512, seed=0)
    return {
        "base": base,
        "ft1": perturb_model(base, root / "ft1", scale=0.01, seed=1),
        "ft2": perturb_model(base, root / "ft2", scale=0.02, seed=2),
    }


def linear_recipe(tmp_path: Path, *models: Path | str, extra: str = "", name: str = "recipe.yml") -> Path:
    lines = ["merge_method: linear", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: {weight: 1.0}"]
    recipe = tmp_path / name
    recipe.write_text("\n".join(lines) + "\n" + extra)
    return recipe


def run_merge_cli(*args: str):
    return CliRunner().invoke(main, ["merge", *map(str, args), "-q"])


def assert_one_line_exit_2(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fusemerge: error: ")
    return lines[0]


def assert_nothing_final(out: Path) -> None:
    """No model file under a final name: nothing that could pass for a finished merge."""
    if not out.exists():
        return
    final = [p.name for p in out.iterdir() if p.name.startswith("model") or p.name == "config.json"]
    assert not final, final


def copy_model(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    """Edit a safetensors header in place, keeping the tensor bytes as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def shard_in_two(folder: Path) -> tuple[Path, Path]:
    """Split a single-file model into two shards with an index; returns the shard paths."""
    from safetensors.torch import load_file, save_file

    single = folder / "model.safetensors"
    tensors = load_file(single)
    names = sorted(tensors)
    half = len(names) // 2
    first, second = folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"
    save_file({n: tensors[n] for n in names[:half]}, first, metadata={"format": "pt"})
    save_file({n: tensors[n] for n in names[half:]}, second, metadata={"format": "pt"})
    single.unlink()
    weight_map = {n: (first if i < half else second).name for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return first, second
