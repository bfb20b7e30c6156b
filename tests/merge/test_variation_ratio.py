"""VaRM against an independent computation of the paper's formula, plus its edge cases."""

from __future__ import annotations

import shutil

import pytest
import torch

from fusemerge.errors import FusemergeError
from fusemerge.merge.api import run_merge
from fusemerge.merge.methods.variation_ratio import variation_stats, variation_weights
from fusemerge.merge.parameters import layer_index
from tests.merge.oracle import load_folder

RECIPE = """
merge_method: {method}
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
    parameters: {{weight: {w2}}}
  - model: {ft3}
parameters: {{granularity: {granularity}}}
dtype: float32
"""


def _reference(family, granularity: str, w2: float) -> dict[str, torch.Tensor]:
    """W_j = w_j * mean((theta_j - theta_base)^2) / sum_k (...), pooled per matrix, layer or model."""
    base = {k: v.double() for k, v in load_folder(family["base"]).items()}
    models = [{k: v.double() for k, v in load_folder(family[f"ft{i}"]).items()} for i in (1, 2, 3)]
    weights = [1.0, w2, 1.0]

    def group(name: str) -> str:
        if granularity == "model":
            return "all"
        if granularity == "layer" and layer_index(name) is not None:
            return f"layer{layer_index(name)}"
        return name

    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for name, b in base.items():
        g = group(name)
        sq = [float(((m[name] - b) ** 2).sum()) for m in models]
        sums[g] = [a + s for a, s in zip(sums.get(g, [0.0] * 3), sq, strict=True)]
        counts[g] = counts.get(g, 0) + b.numel()
    out = {}
    for name in base:
        g = group(name)
        v = [w * s / counts[g] for w, s in zip(weights, sums[g], strict=True)]
        coeff = [x / sum(v) for x in v]
        out[name] = sum(c * m[name] for c, m in zip(coeff, models, strict=True)).float()
    return out


@pytest.mark.parametrize(
    ("granularity", "w2", "method"),
    [("matrix", 1.0, "variation_ratio"), ("layer", 0.5, "varm"), ("model", 2.0, "variation_ratio")],
)
def test_matches_independent_formula(granularity, w2, method, llama_fp32, tmp_path, write_recipe):
    text = RECIPE.format(
        method=method, granularity=granularity, w2=w2, **{k: str(v) for k, v in llama_fp32.items()}
    )
    merged = load_folder(run_merge(write_recipe(text), tmp_path / "out", progress=False, echo=lambda _: None))
    expected = _reference(llama_fp32, granularity, w2)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_uniform_weights_when_every_delta_is_zero(llama_fp32, tmp_path, write_recipe):
    base = llama_fp32["base"]
    copies = [shutil.copytree(base, tmp_path / f"copy{i}") for i in (1, 2)]
    text = f"merge_method: variation_ratio\nbase_model: {base}\nmodels:\n  - model: {copies[0]}\n  - model: {copies[1]}\n"
    merged = load_folder(run_merge(write_recipe(text), tmp_path / "out", progress=False, echo=lambda _: None))
    original = load_folder(base)
    for name, tensor in original.items():
        assert torch.equal(merged[name], tensor), name
        assert torch.isfinite(merged[name]).all()
    # The merged model is the base whatever weights sum to 1, so the weights themselves are checked:
    # every W_j is 1/2 (with or without per-model weights), not 0/0 and not one model taking it all.
    for name, tensor in list(original.items())[:4]:
        stats = variation_stats([tensor.clone(), tensor.clone()], tensor)
        assert stats[:, 0].tolist() == [0.0, 0.0], name
        assert variation_weights(stats) == [0.5, 0.5], name
        assert variation_weights(stats, [3.0, 1.0]) == [0.5, 0.5], name
    three = variation_stats([tensor] * 3, tensor)
    assert variation_weights(three) == [1 / 3] * 3


def test_varm_weights_follow_variation(llama_fp32, tmp_path, write_recipe):
    """A model that moved a matrix far from the base dominates it; one that did not barely counts."""
    base = llama_fp32["base"]
    unchanged = shutil.copytree(base, tmp_path / "unchanged")
    text = f"merge_method: varm\nbase_model: {base}\nmodels:\n  - model: {unchanged}\n  - model: {llama_fp32['ft2']}\n"
    merged = load_folder(run_merge(write_recipe(text), tmp_path / "out", progress=False, echo=lambda _: None))
    moved = load_folder(llama_fp32["ft2"])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, moved[name], msg=name)


def test_requires_base_model(llama_fp32, write_recipe, tmp_path):
    text = f"merge_method: variation_ratio\nmodels:\n  - model: {llama_fp32['ft1']}\n  - model: {llama_fp32['ft2']}\n"
    with pytest.raises(FusemergeError, match="needs a base_model"):
        run_merge(write_recipe(text), tmp_path / "out", progress=False)


def test_requires_two_models(llama_fp32, write_recipe, tmp_path):
    text = f"merge_method: variation_ratio\nbase_model: {llama_fp32['base']}\nmodels:\n  - model: {llama_fp32['ft1']}\n"
    with pytest.raises(FusemergeError, match="at least 2"):
        run_merge(write_recipe(text), tmp_path / "out", progress=False)


def test_rejects_unknown_granularity(llama_fp32, write_recipe, tmp_path):
    text = RECIPE.format(method="varm", granularity="row", w2=1, **{k: str(v) for k, v in llama_fp32.items()})
    with pytest.raises(FusemergeError, match="granularity"):
        run_merge(write_recipe(text), tmp_path / "out", progress=False)
