"""A recipe mergekit 0.1.5 accepts is accepted: unused parameters warn (file:line) and are ignored, as
mergekit ignores them; `--strict` makes them errors; unknown keys stay errors; recipe errors name file:line.

The recipes are mergekit's own test recipes (tests/test_basic_merges.py gives every method a `weight`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fusemerge.cli import main
from tests.merge.conformance import load_tensors, picollama


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trio")
    return {name: picollama(root / name, seed) for seed, name in enumerate("abc", start=1)}


def merge(recipe: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["merge", str(recipe), str(out), "-q", *extra])


def write(tmp_path: Path, text: str, trio: dict[str, Path]) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(text.format(**{k: str(v) for k, v in trio.items()}))
    return path


# mergekit's test_sce_merge: weights 0.6/0.4, which SCE does not use. Line 6 holds the first weight.
SCE = """merge_method: sce
base_model: {c}
models:
  - model: {a}
    parameters:
      weight: 0.6
  - model: {b}
    parameters: {{weight: 0.4}}
parameters: {{select_topk: 0.5}}
dtype: bfloat16
"""
SCE_NO_WEIGHTS = """merge_method: sce
base_model: {c}
models:
  - model: {a}
  - model: {b}
parameters: {{select_topk: 0.5}}
dtype: bfloat16
"""


def test_unused_weight_warns_with_line_and_is_ignored(trio, tmp_path):
    recipe = write(tmp_path, SCE, trio)
    result = merge(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    warning = f"{recipe}:6, key 'models[0].parameters.weight': not used by 'sce'; ignored, as mergekit does"
    assert result.output.count(warning) == 1, result.output
    assert f"{recipe}:8, key 'models[1].parameters.weight'" in result.output
    plain = tmp_path / "plain"
    plain.mkdir()
    assert merge(write(plain, SCE_NO_WEIGHTS, trio), tmp_path / "out-plain").exit_code == 0
    ours, reference = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "out-plain")
    assert all(torch.equal(ours[n], reference[n]) for n in reference)


def test_strict_turns_the_warning_into_an_error(trio, tmp_path):
    recipe = write(tmp_path, SCE, trio)
    result = merge(recipe, tmp_path / "out", "--strict")
    assert result.exit_code == 2
    assert f"{recipe}:6, key 'models[0].parameters.weight': not used by 'sce'" in result.output
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("slerp", "base_model: {a}\nparameters: {{t: 0.35}}\n"),
        ("model_stock", "base_model: {c}\n"),
        ("karcher", "parameters: {{max_iter: 5, tol: 1.0e-5}}\n"),
        ("nearswap", "base_model: {a}\nparameters: {{t: 0.0001}}\n"),
        ("ram", "base_model: {c}\n"),
        ("arcee_fusion", "base_model: {a}\n"),
    ],
    ids=["slerp", "model_stock", "karcher", "nearswap", "ram", "arcee_fusion"],
)
def test_mergekit_test_recipes_with_weights_run(method, params, trio, tmp_path):
    text = (
        f"merge_method: {method}\n{params}models:\n  - model: {{a}}\n    parameters: {{{{weight: 0.6}}}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n"
    )
    result = merge(write(tmp_path, text, trio), tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"not used by '{method}'; ignored, as mergekit does" in result.output


def test_int8_mask_on_linear_warns(trio, tmp_path):
    text = (
        "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5}}\nparameters:\n  int8_mask: true\ndtype: bfloat16\n"
    )
    recipe = write(tmp_path, text, trio)
    result = merge(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{recipe}:8, key 'parameters.int8_mask': not used by 'linear'" in result.output


def test_recipes_run_by_mergekit_warn_too(trio, tmp_path):
    # slices go to the mergekit engine; the slerp weight there is just as unused
    text = (
        "slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n        parameters: {{weight: 0.5}}\n"
        "      - model: {b}\n        layer_range: [0, 2]\nmerge_method: slerp\nbase_model: {a}\n"
        "parameters: {{t: 0.5}}\ndtype: bfloat16\n"
    )
    recipe = write(tmp_path, text, trio)
    result = merge(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "engine: mergekit" in result.output
    assert f"{recipe}:5, key 'slices[0].sources[0].parameters.weight': not used by 'slerp'" in result.output
    forced = merge(write(tmp_path, SCE, trio), tmp_path / "out-forced", "--engine", "mergekit")
    assert forced.exit_code == 0, forced.output
    assert "not used by 'sce'; ignored, as mergekit does" in forced.output


def test_unknown_keys_stay_errors(trio, tmp_path):
    recipe = write(tmp_path, SCE.replace("dtype:", "out_dtyp: float32\ndtype:"), trio)
    result = merge(recipe, tmp_path / "out")
    assert result.exit_code == 2
    assert f"{recipe}:10, key 'out_dtyp': unknown key" in result.output


@pytest.mark.parametrize(
    ("text", "line"),
    [
        # a required parameter missing: the model's entry
        ("merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n    parameters: {{weight: 1}}\n", 3),
        # the method needs a base model
        ("merge_method: ties\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n", 1),
        # a model listed twice
        (
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {a}\n"
            "    parameters: {{weight: 1}}\n",
            2,
        ),
        # an unknown chat template
        (
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\nchat_template: nope\n",
            5,
        ),
        # tokenizer_source naming no model of the recipe
        (
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\ntokenizer_source: {c}\n",
            5,
        ),
        # a value of the wrong type
        ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [a, b]}}\n", 4),
    ],
    ids=["missing-weight", "no-base", "listed-twice", "chat-template", "tokenizer-source", "bad-value"],
)
def test_every_recipe_error_names_file_and_line(text, line, trio, tmp_path):
    recipe = write(tmp_path, text, trio)
    result = merge(recipe, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert re.search(rf"{re.escape(str(recipe))}:{line}\b", result.output), result.output
