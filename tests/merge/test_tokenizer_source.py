"""`tokenizer_source: base | <model>` as mergekit does it: rows taken by token, never mixed by index.

Built from mergekit 0.1.5's tests/test_tokenizer.py (`test_source_base`, `test_source_model`: a base of 64
tokens, a "padded" model whose tokenizer adds 4 tokens beyond its 64 rows, a ChatML model of 66), plus the
case that used to come out silently wrong: two models of the same vocabulary size whose added tokens
differ (`<|im_start|>`/`<|im_end|>` against `<|eot_id|>`/`<|pad|>`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fusemerge.cli import main
from tests.merge.conformance import bpe_tokenizer, load_tensors, picollama
from tests.merge.oracle import run_mergekit

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    spec = {
        "base": (64, []),
        "padded": (64, [f"<UNUSED_{i}>" for i in range(4)]),
        "chatml": (66, ["<|im_start|>", "<|im_end|>"]),
        "eot": (66, ["<|eot_id|>", "<|pad|>"]),
        "twin": (64, []),
    }
    out = {}
    for seed, (name, (rows, added)) in enumerate(spec.items(), start=40):
        out[name] = picollama(root / name, seed, rows)
        bpe_tokenizer(64, added).save_pretrained(out[name])
    return out


def recipe(models: dict[str, Path], names: list[str], base: str, source: str) -> str:
    lines = ["merge_method: linear", f"base_model: {models[base]}", "models:"]
    lines += [f"  - model: {models[n]}\n    parameters: {{weight: 1.0}}" for n in names]
    src = source if source in ("base", "union") else str(models[source])
    return "\n".join([*lines, "dtype: float32", f"tokenizer_source: {src}"]) + "\n"


def fusemerge(text: str, tmp_path: Path, *extra: str):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "ours"), "-q", *extra])
    return result, tmp_path / "ours"


def assert_equal_to_mergekit(text: str, tmp_path: Path, ours: Path) -> None:
    theirs = load_tensors(run_mergekit(text, tmp_path / "mergekit"))
    got = load_tensors(ours)
    assert set(got) == set(theirs)
    for name, expected in theirs.items():
        assert got[name].shape == expected.shape, name
        torch.testing.assert_close(got[name], expected, rtol=2e-6, atol=2e-7, msg=name)


@pytest.mark.parametrize(
    ("names", "base", "source"),
    [
        pytest.param(["base", "padded", "chatml"], "base", "base", id="test_source_base"),
        pytest.param(["base", "padded", "chatml"], "base", "chatml", id="test_source_model"),
        pytest.param(["chatml", "eot"], "chatml", "chatml", id="same-size-other-tokens"),
        pytest.param(["chatml", "eot"], "chatml", "eot", id="same-size-other-tokens-source-eot"),
    ],
)
def test_rows_follow_their_tokens_as_in_mergekit(models, names, base, source, tmp_path):
    text = recipe(models, names, base, source)
    result, ours = fusemerge(text, tmp_path)
    assert result.exit_code == 0, result.output
    assert "tokenizer" in result.output.splitlines()[0]  # the engine line says why
    assert_equal_to_mergekit(text, tmp_path, ours)


def test_streaming_engine_refuses_and_says_mergekit_handles_it(models, tmp_path):
    result, _ = fusemerge(
        recipe(models, ["chatml", "eot"], "chatml", "chatml"), tmp_path, "--engine", "streaming"
    )
    assert result.exit_code == 2
    assert "tokenizer_source" in result.output and "--engine mergekit" in result.output


def test_identical_tokenizers_stay_on_the_streaming_engine(models, tmp_path):
    text = recipe(models, ["base", "twin"], "base", "base")
    result, ours = fusemerge(text, tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("engine: streaming")
    assert_equal_to_mergekit(text, tmp_path, ours)
