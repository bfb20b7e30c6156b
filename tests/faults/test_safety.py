"""Safety defaults: no pickle and no remote code unless asked; a Hub token never leaks into anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusemerge.errors import FusemergeError
from tests.faults.conftest import assert_nothing_final, assert_one_line_exit_2, linear_recipe, run_merge_cli

ROOT = Path(__file__).parents[2]
FAKE_TOKEN = "hf_FuSeMeRgEfAkEtOkEn0123456789abcdef"


def test_pickle_inputs_refused_without_flag(small_family, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(small_family["ft1"] / "config.json", pickled / "config.json")
    torch.save(load_file(small_family["ft1"] / "model.safetensors"), pickled / "pytorch_model.bin")
    out = tmp_path / "out"
    line = assert_one_line_exit_2(run_merge_cli(linear_recipe(tmp_path, small_family["ft2"], pickled), out))
    assert "--allow-pickle" in line and "pickle" in line
    assert_nothing_final(out)


def test_remote_code_is_never_run_unless_asked(small_family, tmp_path):
    """A model folder whose config points at custom code: loading it must not import that code."""
    from fusemerge.fuse.teacher import TeacherSettings, load_teacher_model

    folder = shutil.copytree(small_family["ft1"], tmp_path / "custom")
    marker = tmp_path / "remote_code_ran"
    (folder / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(
        {
            "model_type": "evil",
            "auto_map": {
                "AutoConfig": "evil_model.EvilConfig",
                "AutoModelForCausalLM": "evil_model.EvilModel",
            },
        }
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FusemergeError):
        load_teacher_model(str(folder), TeacherSettings(), "cpu", progress=False)
    assert not marker.exists(), "remote code ran without trust_remote_code"


def test_hub_token_never_appears_in_outputs(small_family, tmp_path):
    """With a recognisable token in the environment, nothing fusemerge prints or writes contains it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_TOKEN": FAKE_TOKEN,
        "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN,
    }
    out = tmp_path / "out"
    recipe = linear_recipe(tmp_path, small_family["ft1"], small_family["ft2"])
    runs = [
        ["merge", str(recipe), str(out), "--dry-run"],
        ["merge", str(recipe), str(out)],
        ["merge", str(recipe), str(out)],  # the 'already complete' path
        [
            "merge",
            str(linear_recipe(tmp_path, small_family["ft1"], "someone/not-cached", name="hub.yml")),
            str(tmp_path / "o2"),
        ],
        ["-v", "merge", str(recipe), str(tmp_path / "o3")],
    ]
    printed = ""
    for args in runs:
        result = subprocess.run(
            [sys.executable, "-m", "fusemerge.cli", *args], env=env, capture_output=True, text=True
        )
        printed += result.stdout + result.stderr
    assert "merged" in printed and "hf download someone/not-cached" in printed
    assert FAKE_TOKEN not in printed
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in written) and any(
        p.name == "fusemerge_recipe.yml" for p in written
    )
    for path in written:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path
