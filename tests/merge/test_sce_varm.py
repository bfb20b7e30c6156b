"""VaRM is SCE with `select_topk: 1` where no sign conflict triggers SCE's erase step, and only there."""

from __future__ import annotations

import torch

from fusemerge.merge.api import run_merge
from fusemerge.merge.methods import get_method
from tests.merge.oracle import load_folder


def _both(tensors, base):
    varm = get_method("variation_ratio").fn(tensors, base, weight=[1.0] * len(tensors), granularity="matrix")
    sce = get_method("sce").fn(tensors, base, int8_mask=False, select_topk=1.0)
    return varm, sce


def test_equal_when_all_deltas_agree_in_sign():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(256, 384, generator=gen) * 0.02
    sign = torch.where(torch.rand(base.shape, generator=gen) < 0.5, -1.0, 1.0)  # per element, shared
    scales = (0.01, 0.03, 0.002)
    tensors = [base + sign * (torch.rand(base.shape, generator=gen) + 0.05) * s for s in scales]
    varm, sce = _both(tensors, base)
    torch.testing.assert_close(varm, sce, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(varm, sum(tensors) / 3)  # and it is not a plain average


def test_different_where_signs_conflict(llama_fp32, tmp_path, write_recipe):
    text = """
merge_method: {method}
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
dtype: float32
"""
    refs = {k: str(v) for k, v in llama_fp32.items()}
    name = "model.layers.1.self_attn.o_proj.weight"
    out = {}
    for method in ("variation_ratio", "sce"):
        recipe = write_recipe(text.format(method=method, **refs), f"{method}.yml")
        out[method] = load_folder(run_merge(recipe, tmp_path / method, progress=False, echo=lambda _: None))[
            name
        ]
    base = load_folder(llama_fp32["base"])[name]
    deltas = torch.stack([load_folder(llama_fp32[f"ft{i}"])[name] - base for i in (1, 2, 3)])
    conflict = (deltas > 0).any(dim=0) & (deltas < 0).any(dim=0)
    agree = (deltas > 0).all(dim=0) | (deltas < 0).all(dim=0)
    assert conflict.float().mean() > 0.1
    differ = ~torch.isclose(out["variation_ratio"], out["sce"], rtol=1e-5, atol=1e-7)
    assert differ[conflict].float().mean() > 0.9  # SCE erased the minority deltas there
    assert not differ[agree].any()  # and nowhere else
