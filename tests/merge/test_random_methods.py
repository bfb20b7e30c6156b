"""DARE and DELLA: reproducible under a seed, and their masks and rescaling match `density` statistically.

mergekit draws from torch's global RNG in graph order, so no seed makes the two engines draw the same
masks; what must hold is reproducibility (same seed, same model; another seed, another model) and the
statistics: the kept fraction is `density` within 5 standard deviations of a Binomial(n, density), and
`rescale` restores each task vector's L1 norm (a factor close to 1 / density).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fusemerge.errors import FusemergeError
from fusemerge.merge.api import run_merge
from fusemerge.merge.methods import get_method
from fusemerge.merge.seeds import derive_seed
from fusemerge.offline.assets import build_random_model, perturb_model
from tests.merge.conftest import BF16_DELTAS
from tests.merge.oracle import load_folder

RECIPE = """
merge_method: {method}
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: [0.3, 0.7]}}
  - model: {ft2}
    parameters:
      weight: 0.5
      density:
        - filter: mlp
          value: 0.4
        - value: 0.6
dtype: bfloat16
"""
RANDOM_METHODS = ["dare_ties", "della_linear"]  # one per kind of mask: per chunk and held


@pytest.fixture(scope="module")
def small_bf16(tmp_path_factory) -> dict[str, Path]:
    """A small-vocabulary Mistral family: these tests merge each recipe three times."""
    root = tmp_path_factory.mktemp("small_bf16")
    base = build_random_model(root / "base", architecture="mistral", vocab_size=1000, dtype="bfloat16")
    family = {"base": base}
    for i, (scale, fraction) in enumerate(BF16_DELTAS, start=1):
        family[f"ft{i}"] = perturb_model(base, root / f"ft{i}", scale=scale, seed=i, fraction=fraction)
    return family


def _merge(recipe, out, seed):
    return load_folder(run_merge(recipe, out, progress=False, echo=lambda _: None, random_seed=seed))


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_same_seed_same_model_other_seed_other_model(method, small_bf16, tmp_path, write_recipe):
    recipe = write_recipe(RECIPE.format(method=method, **{k: str(v) for k, v in small_bf16.items()}))
    first = _merge(recipe, tmp_path / "a", 7)
    again = _merge(recipe, tmp_path / "b", 7)
    other = _merge(recipe, tmp_path / "c", 8)
    for name in first:
        assert torch.equal(first[name], again[name]), name
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(first[name], other[name])
    # The engine's tensor is the method's pure function of the inputs and a seed derived from the tensor
    # name alone, whatever order the reader thread delivered the tensors in.
    base, ft1, ft2 = (load_folder(small_bf16[k])[name] for k in ("base", "ft1", "ft2"))
    m = get_method(method)
    params = {key: p.default for key, p in m.shared.items()}
    per_model = {"weight": [0.6, 0.5], "density": [0.3, 0.4]}
    if "epsilon" in m.per_model:
        per_model["epsilon"] = [0.15, 0.15]
    direct = m.fn([ft1, ft2], base, seed=derive_seed(7, name), **params, **per_model)
    assert torch.equal(direct.to(torch.bfloat16), first[name])


def _single(method: str, delta: torch.Tensor, density: float, rescale: bool, seed: int = 3) -> torch.Tensor:
    m = get_method(method)
    base = torch.zeros_like(delta)
    params = {key: p.default for key, p in m.shared.items()} | {"rescale": rescale, "normalize": False}
    per_model = {"weight": [1.0], "density": [density]}
    if "epsilon" in m.per_model:
        per_model["epsilon"] = [0.1]
    return m.fn([delta], base, seed=seed, **params, **per_model)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_kept_fraction_and_rescale_match_density(method, density):
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(768, 1024, generator=gen)
    n = delta.numel()
    kept = _single(method, delta, density, rescale=False)
    nonzero = int((kept != 0).sum())
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(nonzero - density * n) < 5 * sigma
    assert torch.equal(kept[kept != 0], delta[kept != 0])  # survivors are untouched without rescale

    rescaled = _single(method, delta, density, rescale=True)
    assert torch.equal(rescaled != 0, kept != 0)  # same seed, same mask
    factor = float(rescaled.abs().sum() / kept.abs().sum())
    assert factor == pytest.approx(float(delta.abs().sum() / kept.abs().sum()), rel=1e-5)
    assert float(rescaled.abs().sum(dtype=torch.float64)) == pytest.approx(
        float(delta.abs().sum(dtype=torch.float64)), rel=1e-5
    )
    # For DARE every element is equally likely to survive, so the L1 factor is close to 1 / density;
    # DELLA favours large magnitudes, so its factor is below 1 / density.
    if method == "dare_linear":
        assert factor == pytest.approx(1 / density, rel=0.02)
    else:
        assert factor < 1 / density


def test_della_keeps_large_magnitudes_more_often():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(2048, 512, generator=gen)
    kept = _single("della_linear", delta, 0.5, rescale=False) != 0
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
    low, high = kept[ranks < 0.1].float().mean(), kept[ranks > 0.9].float().mean()
    # Keep probability runs from density - eps (0.4) to density + eps (0.6) with the rank.
    assert float(low) == pytest.approx(0.405, abs=0.01)
    assert float(high) == pytest.approx(0.595, abs=0.01)


def test_della_epsilon_out_of_range_is_refused_before_work(small_bf16, write_recipe, tmp_path):
    recipe = write_recipe(
        RECIPE.format(method="della", **{k: str(v) for k, v in small_bf16.items()}).replace(
            "dtype: bfloat16", "parameters: {epsilon: 0.35}\ndtype: bfloat16"
        )
    )
    with pytest.raises(FusemergeError, match="epsilon") as info:
        run_merge(recipe, tmp_path / "out", dry_run=True, echo=lambda _: None)
    assert info.value.key == "parameters.epsilon"
    assert not (tmp_path / "out").exists()
