"""DARE and DELLA: reproducible under a seed, and their masks and rescaling match `density` statistically.

mergekit draws from torch's global RNG in graph order, so no seed makes the two engines draw the same
masks; what must hold is reproducibility (same seed, same model; another seed, another model) and the
statistics: the kept fraction is `density` within 5 standard deviations of a Binomial(n, density), and
`rescale` restores each task vector's L1 norm (a factor close to 1 / density).

Where the methods are deterministic (density 1: nothing is dropped, so no draw is made in either engine)
the merged model must equal mergekit's, weights, sign election and normalisation included. With
density < 1 and several models, every merged element must be one of the values the formula allows
(the base plus the weighted sum of some subset of the task vectors), and the subsets must be drawn with
each model's own density, independently of the other model's.
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
from tests.merge.oracle import load_folder, run_mergekit

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
    density, epsilon = 0.5, 0.1  # the epsilon `_single` passes
    kept = _single("della_linear", delta, density, rescale=False) != 0
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
    # MagPrune (mergekit's della_magprune): an element whose magnitude has normalised rank u in [0, 1]
    # within its row is kept with probability p(u) = (density - eps) + 2 eps u, from 0.4 to 0.6 here.
    # A bin's expected keep rate is p at the bin's mean u. The rows have 512 columns, so u = r / 511:
    # u < 0.1 holds for r = 0..51 (mean u = 25.5 / 511 = 0.0499, p = 0.4 + 0.2 * 0.0499 = 0.4100) and
    # u > 0.9 for r = 460..511 (mean u = 485.5 / 511 = 0.9501, p = 0.5900).
    for in_bin in (ranks < 0.1, ranks > 0.9):
        u = float(ranks[in_bin].mean())
        expected = (density - epsilon) + 2 * epsilon * u
        trials = int(in_bin.sum())
        sigma = math.sqrt(expected * (1 - expected) / trials)
        assert float(kept[in_bin].float().mean()) == pytest.approx(expected, abs=5 * sigma)
    assert (density - epsilon) + 2 * epsilon * 25.5 / 511 == pytest.approx(0.41, abs=1e-4)
    assert (density - epsilon) + 2 * epsilon * 485.5 / 511 == pytest.approx(0.59, abs=1e-4)
    # Every rank at once: the least-squares line of keep rate on u has intercept density - eps and
    # slope 2 eps. With 2048 x 512 Bernoulli trials the slope's standard error is
    # sqrt(p (1 - p) / (n var(u))) = sqrt(0.25 * 12 / 1048576) = 0.0017, so 5 of them bound eps to
    # +/- 0.0043 (an epsilon of 0.11 or 0.09 is more than 10 standard errors off).
    u, k = ranks.flatten().double(), kept.flatten().double()
    slope = float(((u - u.mean()) * (k - k.mean())).sum() / ((u - u.mean()) ** 2).sum())
    intercept = float(k.mean()) - slope * float(u.mean())
    se = math.sqrt(0.25 * 12 / u.numel())
    assert slope / 2 == pytest.approx(epsilon, abs=5 * se / 2)
    assert intercept == pytest.approx(density - epsilon, abs=5 * math.sqrt(0.25 * 4 / u.numel()))


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


DETERMINISTIC = """
merge_method: {method}
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [0.3, 0.9], density: 1.0{eps}}}
  - model: {ft2}
    parameters:
      weight:
        - filter: mlp
          value: -0.4
        - value: 0.7
      density: 1.0{eps_block}
  - model: {ft3}
    parameters: {{weight: 0.5, density: 1.0{eps}}}
dtype: float32
"""


@pytest.fixture(scope="module")
def small_fp32(tmp_path_factory) -> dict[str, Path]:
    """A small-vocabulary float32 Mistral family with dense task vectors of different scales."""
    root = tmp_path_factory.mktemp("small_fp32")
    base = build_random_model(root / "base", architecture="mistral", vocab_size=1000, dtype="float32")
    family = {"base": base}
    for i, scale in enumerate((0.02, 0.05, 0.01), start=1):
        family[f"ft{i}"] = perturb_model(base, root / f"ft{i}", scale=scale, seed=i)
    return family


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_density_one_equals_mergekit(method, small_fp32, tmp_path, write_recipe):
    """At density 1 nothing is dropped and nothing is drawn: the merge is deterministic in both engines,
    so mergekit 0.1.5 is an oracle for the whole result (three models, a weight gradient and a filter,
    negative weights, sign election for the `_ties`/`della` kinds, della's normalisation)."""
    della = method.startswith("della")  # DELLA's epsilon, 0: no magnitude ranking either
    text = DETERMINISTIC.format(
        method=method,
        eps=", epsilon: 0.0" if della else "",
        eps_block="\n      epsilon: 0.0" if della else "",
        **{k: str(v) for k, v in small_fp32.items()},
    )
    ours = load_folder(
        run_merge(
            write_recipe(text),
            tmp_path / "ours",
            progress=False,
            echo=lambda _: None,
            random_seed=5,
            engine="streaming",
        )
    )
    theirs = load_folder(run_mergekit(text, tmp_path / "mergekit", seed=0))
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == torch.float32, name
        torch.testing.assert_close(ours[name], expected, rtol=2e-6, atol=2e-7, msg=name)


TWO_MODELS = """
merge_method: {method}
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 0.3}}
  - model: {ft2}
    parameters: {{weight: 1.7, density: 0.7}}
parameters: {{rescale: false, normalize: false}}
dtype: float32
"""


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_two_weighted_models_over_a_base_keep_independent_subsets_at_their_densities(
    method, small_fp32, tmp_path, write_recipe
):
    """merged = base + 0.6 m1 d1 + 1.7 m2 d2 element by element, with masks m1, m2 in {0, 1}: each
    element must be one of the four values, m1 must keep 30% of d1, m2 70% of d2, and both 21%."""
    text = TWO_MODELS.format(method=method, **{k: str(v) for k, v in small_fp32.items()})
    merged = load_folder(
        run_merge(
            write_recipe(text),
            tmp_path / "out",
            progress=False,
            echo=lambda _: None,
            random_seed=2,
            engine="streaming",
        )
    )
    base, ft1, ft2 = (load_folder(small_fp32[k]) for k in ("base", "ft1", "ft2"))
    total = {"m1": 0, "m2": 0, "both": 0, "n": 0}
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        b = base[name].double()
        a1, a2 = 0.6 * (ft1[name].double() - b), 1.7 * (ft2[name].double() - b)
        residual = merged[name].double() - b
        candidates = torch.stack([torch.zeros_like(b), a1, a2, a1 + a2])  # m = (0,0), (1,0), (0,1), (1,1)
        distance = (residual.unsqueeze(0) - candidates).abs()
        best = distance.argmin(dim=0)
        assert float(distance.min(dim=0).values.max()) < 1e-6, name  # float32 rounding of base + sum
        # Only where the four values are well apart is the subset identified without doubt.
        clear = (a1.abs() > 1e-4) & (a2.abs() > 1e-4) & ((a1 + a2).abs() > 1e-4) & ((a1 - a2).abs() > 1e-4)
        m1, m2 = (best % 2 == 1)[clear], (best >= 2)[clear]
        total["m1"] += int(m1.sum())
        total["m2"] += int(m2.sum())
        total["both"] += int((m1 & m2).sum())
        total["n"] += int(clear.sum())
    n = total["n"]
    assert n > 0.9 * (8192 + 4096)
    for key, p in (("m1", 0.3), ("m2", 0.7), ("both", 0.3 * 0.7)):
        assert abs(total[key] - p * n) < 5 * math.sqrt(n * p * (1 - p)), (key, total[key] / n)
