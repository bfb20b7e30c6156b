"""Bad input gets one clear line naming the file, key or tensor at fault, and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fusemerge.cli import main


def _run(*args: str):
    result = CliRunner().invoke(main, ["merge", *args, "-q"])
    return result


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fusemerge: error: ")
    return lines[0]


def _linear(a: Path, b: Path, extra: str = "") -> str:
    return f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n{extra}"


def test_unreadable_yaml_names_line(write_recipe, tmp_path):
    recipe = write_recipe("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n")
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert f"{recipe}:4" in line and "invalid YAML" in line


def test_unknown_method(write_recipe, llama_fp32, tmp_path):
    recipe = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft2"]).replace("linear", "lineer"))
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert "unknown merge method 'lineer'" in line and "merge_method" in line


def test_unknown_key_names_key_and_line(write_recipe, llama_fp32, tmp_path):
    recipe = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft2"], "out_dtyp: float16\n"))
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert "key 'out_dtyp'" in line and f"{recipe}:7" in line and "unknown key" in line


def test_unused_parameter_warns_and_strict_refuses(write_recipe, llama_fp32, tmp_path):
    # mergekit ignores a parameter the method does not take: one warning line, or an error with --strict
    recipe = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft2"], "parameters: {densty: 0.5}\n"))
    result = _run(str(recipe), str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"fusemerge: warning: {recipe}:7, key 'parameters.densty': not used by 'linear'; ignored, as mergekit does"
    ]
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out2"), "--strict"))
    assert f"{recipe}:7, key 'parameters.densty'" in line


def test_missing_model_folder(write_recipe, llama_fp32, tmp_path):
    recipe = write_recipe(_linear(llama_fp32["ft1"], tmp_path / "nowhere"))
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert "nowhere" in line and "not found" in line


def test_missing_hub_model_says_how_to_download(write_recipe, llama_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    recipe = write_recipe(_linear(llama_fp32["ft1"], "someone/not-downloaded"))
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert "hf download someone/not-downloaded" in line


def test_shape_mismatch_names_tensor(write_recipe, llama_fp32, tmp_path):
    other = shutil.copytree(llama_fp32["ft1"], tmp_path / "other")
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:10].clone()
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(_linear(llama_fp32["ft1"], other))
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert "tensor 'model.norm.weight'" in line and "shapes differ" in line


def test_missing_tensor_names_tensor_and_model(write_recipe, llama_fp32, tmp_path):
    other = shutil.copytree(llama_fp32["ft1"], tmp_path / "other")
    tensors = load_file(other / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(_linear(llama_fp32["ft1"], other))
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert "tensor 'model.layers.1.mlp.up_proj.weight'" in line and str(other) in line


def test_output_exists_without_overwrite(write_recipe, llama_fp32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft2"]))
    line = _one_line_error(_run(str(recipe), str(out)))
    assert "--overwrite" in line
    assert (out / "notes.txt").read_text() == "mine"
    assert _run(str(recipe), str(out), "--overwrite").exit_code == 0
    assert (out / "model.safetensors.index.json").is_file()


def test_different_recipe_into_finished_merge_is_refused(write_recipe, llama_fp32, tmp_path):
    out = tmp_path / "out"
    first = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft2"]), "a.yml")
    assert _run(str(first), str(out)).exit_code == 0
    again = _run(str(first), str(out))
    assert again.exit_code == 0 and "already complete" in again.output
    second = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft3"]), "b.yml")
    assert "different recipe" in _one_line_error(_run(str(second), str(out)))


def test_pickle_checkpoints_need_allow_pickle(write_recipe, llama_fp32, tmp_path):
    import torch

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama_fp32["ft1"] / "config.json", pickled / "config.json")
    torch.save(load_file(llama_fp32["ft1"] / "model.safetensors"), pickled / "pytorch_model.bin")
    recipe = write_recipe(_linear(llama_fp32["ft2"], pickled))
    assert "--allow-pickle" in _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert _run(str(recipe), str(tmp_path / "out"), "--allow-pickle").exit_code == 0


def test_config_json_not_json(write_recipe, llama_fp32, tmp_path):
    broken = shutil.copytree(llama_fp32["ft1"], tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    recipe = write_recipe(_linear(broken, llama_fp32["ft2"]))
    line = _one_line_error(_run(str(recipe), str(tmp_path / "out")))
    assert "config.json" in line and "not valid JSON" in line


@pytest.mark.parametrize("size", ["0", "5 parsecs", "-1GB"])
def test_bad_shard_size(size, write_recipe, llama_fp32, tmp_path):
    recipe = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft2"]))
    assert "--out-shard-size" in _one_line_error(
        _run(str(recipe), str(tmp_path / "out"), "--out-shard-size", size)
    )


def test_dry_run_writes_nothing(write_recipe, llama_fp32, tmp_path):
    recipe = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft2"]))
    result = _run(str(recipe), str(tmp_path / "out"), "--dry-run")
    assert result.exit_code == 0
    assert "tensors:" in result.output and "peak memory" in result.output and "bytes to read" in result.output
    assert not (tmp_path / "out").exists()


def test_output_folder_contents(write_recipe, llama_fp32, tmp_path):
    recipe = write_recipe(_linear(llama_fp32["ft1"], llama_fp32["ft2"], "dtype: bfloat16\n"))
    out = tmp_path / "out"
    assert _run(str(recipe), str(out), "--out-shard-size", "3MB").exit_code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (
        out / "fusemerge_recipe.yml"
    ).read_text() == recipe.read_text()
    card = (out / "README.md").read_text()
    assert "merge" in card and "linear" in card and recipe.read_text().strip().splitlines()[0] in card
    from safetensors import safe_open

    with safe_open(shards[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
