"""mergekit as the fallback engine: frankenmerges, VaRM inside mergekit (the plugin), MoE, engine choice."""

from __future__ import annotations

import sys

import pytest
import torch
from click.testing import CliRunner

from fusemerge.cli import main
from fusemerge.errors import FusemergeError
from fusemerge.merge.api import run_merge
from tests.merge.oracle import load_folder

FRANKEN = """
merge_method: passthrough
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
  - sources:
      - model: {ft1}
        layer_range: [1, 2]
dtype: float32
"""
VARM_SLICES = """
merge_method: variation_ratio
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {ft1}
        layer_range: [0, 2]
      - model: {ft2}
        layer_range: [0, 2]
        parameters: {{weight: 0.5}}
dtype: float32
"""
VARM_MODELS = """
merge_method: variation_ratio
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
    parameters: {{weight: 0.5}}
dtype: float32
"""


def _refs(family):
    return {k: str(v) for k, v in family.items()}


def test_frankenmerge_runs_through_mergekit_and_loads(llama_fp32, tmp_path, write_recipe):
    from transformers import AutoModelForCausalLM

    said: list[str] = []
    out = run_merge(
        write_recipe(FRANKEN.format(**_refs(llama_fp32))), tmp_path / "out", progress=False, echo=said.append
    )
    assert said[0] == "engine: mergekit (the recipe uses slices (a frankenmerge))"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    merged, ft1 = load_folder(out), load_folder(llama_fp32["ft1"])
    for name, tensor in ft1.items():
        if ".layers.1." in name:
            assert torch.equal(merged[name.replace(".layers.1.", ".layers.2.")], tensor), name
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()


def test_variation_ratio_inside_mergekit_slices_equals_streaming(llama_fp32, tmp_path, write_recipe):
    refs = _refs(llama_fp32)
    sliced = run_merge(
        write_recipe(VARM_SLICES.format(**refs), "slices.yml"),
        tmp_path / "slices",
        progress=False,
        echo=lambda _: None,
    )
    streamed = run_merge(
        write_recipe(VARM_MODELS.format(**refs), "models.yml"),
        tmp_path / "streamed",
        progress=False,
        echo=lambda _: None,
    )
    forced: list[str] = []
    via_plugin = run_merge(
        write_recipe(VARM_MODELS.format(**refs), "forced.yml"),
        tmp_path / "forced",
        progress=False,
        echo=forced.append,
        engine="mergekit",
    )
    assert forced[0] == "engine: mergekit (asked for with --engine mergekit)"
    expected = load_folder(streamed)
    for folder in (sliced, via_plugin):
        got = load_folder(folder)
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=2e-6, atol=2e-7, msg=name)


def test_streaming_engine_refuses_slices_by_name(llama_fp32, tmp_path, write_recipe):
    recipe = write_recipe(FRANKEN.format(**_refs(llama_fp32)))
    with pytest.raises(FusemergeError, match="slices") as info:
        run_merge(recipe, tmp_path / "out", engine="streaming", echo=lambda _: None)
    assert info.value.key == "slices"


def test_missing_mergekit_says_how_to_install(llama_fp32, tmp_path, write_recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "mergekit", None)  # import mergekit -> ImportError
    recipe = write_recipe(FRANKEN.format(**_refs(llama_fp32)))
    with pytest.raises(FusemergeError, match=r"pip install 'fusemerge\[mergekit\]'"):
        run_merge(recipe, tmp_path / "out", echo=lambda _: None)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("passthrough", "passthru"), "unknown merge method 'passthru'"),
        (("dtype: float32", "parameters: {scale: 2, t: 0.5}\ndtype: float32"), "not used by 'passthrough'"),
        (
            ("layer_range: [1, 2]", "layer_range: [1, 2]\n        model_typo: 1"),
            r"key 'slices\[1\]\.sources\[0\]\.model_typo'",
        ),
        (("layer_range: [1, 2]", "layer_range: one-two"), "mergekit refuses the recipe"),
    ],
)
def test_fallback_recipe_checked_before_any_work(llama_fp32, tmp_path, write_recipe, edit, message):
    text = FRANKEN.format(**_refs(llama_fp32)).replace(*edit)
    with pytest.raises(FusemergeError, match=message):
        run_merge(write_recipe(text), tmp_path / "out", echo=lambda _: None, strict=True)
    assert not (tmp_path / "out").exists()


def test_fallback_missing_model_fails_before_work(llama_fp32, tmp_path, write_recipe):
    text = FRANKEN.format(**_refs(llama_fp32)).replace(str(llama_fp32["ft1"]), "no-such-org/no-such-model")
    with pytest.raises(FusemergeError, match="hf download no-such-org/no-such-model"):
        run_merge(write_recipe(text), tmp_path / "out", echo=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_cli_says_which_engine_ran(llama_fp32, tmp_path, write_recipe):
    refs = _refs(llama_fp32)
    runner = CliRunner()
    streamed = runner.invoke(
        main,
        ["merge", str(write_recipe(VARM_MODELS.format(**refs), "m.yml")), str(tmp_path / "a"), "--dry-run"],
    )
    assert streamed.exit_code == 0, streamed.output
    assert "engine: streaming (the recipe uses only what the streaming engine does)" in streamed.output
    franken = runner.invoke(
        main, ["merge", str(write_recipe(FRANKEN.format(**refs), "f.yml")), str(tmp_path / "b"), "--dry-run"]
    )
    assert franken.exit_code == 0, franken.output
    assert "engine: mergekit (the recipe uses slices (a frankenmerge))" in franken.output
    refused = runner.invoke(
        main, ["merge", str(tmp_path / "f.yml"), str(tmp_path / "c"), "--engine", "streaming"]
    )
    assert refused.exit_code == 2
    assert "key 'slices'" in refused.output


def test_moe_recipe_runs_through_mergekit(mistral_bf16, tmp_path, write_recipe):
    from transformers import AutoConfig

    text = """
base_model: {base}
gate_mode: random
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: {ft1}
  - source_model: {ft2}
""".format(**_refs(mistral_bf16))
    said: list[str] = []
    out = run_merge(write_recipe(text), tmp_path / "moe", progress=False, echo=said.append, random_seed=0)
    assert said[0] == "engine: mergekit (the recipe uses mergekit-moe's experts format)"
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "mixtral" and config.num_local_experts == 2
    merged, ft2 = load_folder(out), load_folder(mistral_bf16["ft2"])
    experts = merged["model.layers.1.mlp.experts.down_proj"]  # transformers 5's fused expert layout
    assert torch.equal(experts[1], ft2["model.layers.1.mlp.down_proj.weight"])


def test_fallback_output_has_card_recipe_and_complete_manifest(llama_fp32, tmp_path, write_recipe):
    """The fallback shares the streaming engine's output handling: card, recipe, manifest, lock, refusal."""
    from fusemerge.checkpoint.layout import RECIPE_NAME, read_state
    from fusemerge.hub import check_complete

    text = FRANKEN.format(**_refs(llama_fp32))
    out = run_merge(write_recipe(text), tmp_path / "out", progress=False, echo=lambda _: None)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "fusemerge" in card and "passthrough" in card
    assert text.strip() in card  # the recipe, verbatim, in the card
    assert (out / RECIPE_NAME).read_text(encoding="utf-8") == text
    state = read_state(out)
    assert state["status"] == "complete" and state["fingerprint"]
    check_complete(out)  # what `fusemerge push` asks of a folder

    said: list[str] = []
    run_merge(write_recipe(text), out, progress=False, echo=said.append)
    assert said[-1] == f"{out}: this merge is already complete; nothing to do"
    other = text.replace("layer_range: [1, 2]", "layer_range: [0, 1]")
    with pytest.raises(FusemergeError, match="different recipe"):
        run_merge(write_recipe(other, "other.yml"), out, progress=False, echo=lambda _: None)
