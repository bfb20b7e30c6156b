"""Every deterministic method of the streaming engine against mergekit 0.1.5 on the same recipe.

float32 recipes must match to float32 rounding. For bfloat16 recipes mergekit computes these methods in
bf16 arithmetic and fusemerge in float32 with one rounding at the end, so outputs may differ by more than
one bf16 step on a small fraction of elements; each method's bound (measured, with some margin) is stated
in BF16_BEYOND_ONE_STEP below and explained there.
"""

from __future__ import annotations

import pytest
import torch

from fusemerge.merge.api import run_merge
from tests.merge.oracle import (
    beyond_one_step,
    bf16_steps,
    load_folder,
    merge_both,
    run_mergekit,
    worst_tensor,
)

RECIPES = {
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [0.3, 0.7], density: 0.6, gamma: 0.05}}
  - model: {ft2}
    parameters:
      weight:
        - filter: self_attn
          value: 0.8
        - value: 0.4
      density: [0.9, 0.5]
parameters: {{lambda: 0.9}}
dtype: {dtype}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {ft2}
    parameters: {{weight: [0.2, 0.9], density: 0.5, gamma: 0.02}}
  - model: {ft3}
    parameters: {{weight: 0.5, density: 0.995}}
parameters: {{normalize: true}}
dtype: {dtype}
""",
    "sce": """
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters:
  select_topk:
    - filter: mlp
      value: [0.3, 0.8]
    - value: 0.5
dtype: {dtype}
""",
    "sce_all": """
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
dtype: {dtype}
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
dtype: {dtype}
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  filter_wise: [false, true]
dtype: {dtype}
""",
    "nuslerp": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [0.3, 0.8]}}
  - model: {ft2}
    parameters:
      weight:
        - filter: self_attn
          value: 0.9
        - value: 0.5
dtype: {dtype}
""",
    "nuslerp_rows": """
merge_method: nuslerp
models:
  - model: {ft1}
    parameters: {{weight: 0.4}}
  - model: {ft2}
    parameters: {{weight: 0.6}}
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise:
    - filter: mlp
      value: true
    - value: false
dtype: {dtype}
""",
    "multislerp": """
merge_method: multislerp
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [0.2, 0.6]}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.1
dtype: {dtype}
""",
    "karcher": """
merge_method: karcher
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters: {{max_iter: [5, 12], tol: 1.0e-6}}
dtype: {dtype}
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models:
  - model: {ft1}
parameters:
  t:
    - filter: self_attn
      value: [0.001, 0.01]
    - value: 0.005
dtype: {dtype}
""",
    "ram": """
merge_method: ram
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters: {{epsilon: [1.0e-5, 1.0e-3]}}
dtype: {dtype}
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters:
  r: [0.1, 0.4]
  alpha:
    - filter: mlp
      value: 0.5
    - value: 0.2
dtype: {dtype}
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {ft2}
dtype: {dtype}
""",
    "passthrough": """
merge_method: passthrough
models:
  - model: {ft2}
    parameters:
      scale:
        - filter: mlp
          value: [0.5, 2.0]
        - value: 1.0
dtype: {dtype}
""",
}

# mergekit estimates Arcee Fusion's quartiles from a random sample of 10^6 elements on larger tensors;
# fusemerge's are exact. On those tensors only elements near the threshold may differ.
ARCEE_SAMPLED = 1_000_000
ARCEE_NEAR_THRESHOLD = 0.01


def _merge_both(family, method, dtype, tmp_path, write_recipe):
    return merge_both(RECIPES[method], family, dtype, tmp_path, write_recipe)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_float32_equals_mergekit(method, llama_fp32, tmp_path, write_recipe):
    ours, theirs = _merge_both(llama_fp32, method, "float32", tmp_path, write_recipe)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == torch.float32, name
        if method == "arcee_fusion" and expected.numel() > ARCEE_SAMPLED:
            close = torch.isclose(ours[name], expected, rtol=2e-6, atol=2e-7)
            assert float((~close).float().mean()) <= ARCEE_NEAR_THRESHOLD, name
            continue
        torch.testing.assert_close(ours[name], expected, rtol=2e-6, atol=2e-7, msg=name)


# Largest fraction of elements more than one bf16 step from mergekit's, per method, measured on the
# Mistral bf16 family (in parentheses) with some margin. mergekit computes these methods in bf16
# arithmetic (deltas, norms, cosines, sums each rounded to bf16), fusemerge in float32 with one rounding;
# against mergekit run at float32 working precision (`dtype: float32, out_dtype: bfloat16`) every method
# here agrees on all elements except: breadcrumbs(_ties) about 1.2% (magnitude ties at the band edges,
# which mergekit's unstable sort breaks arbitrarily, as for TIES), sce 0.05% (ties in the variance
# selection), arcee_fusion 0.06% (mergekit's sampled quartiles on the two 2M-element tensors).
BF16_BEYOND_ONE_STEP = {
    "breadcrumbs": 0.02,  # (0.0102)
    "breadcrumbs_ties": 0.025,  # (0.0155)
    "model_stock": 0.001,  # (0.00005)
    "model_stock_filter_wise": 0.001,  # (0.0002)
    "multislerp": 0.025,  # (0.0172): bf16 unit vectors and tangent sums
    "nearswap": 0.001,  # (0.0001)
    "nuslerp": 0.01,  # (0.0063)
    "nuslerp_rows": 0.035,  # (0.0249): bf16 cosines of 64-element rows
    "passthrough": 0.0,  # (0)
    "ram": 0.005,  # (0.0019)
    "ramplus_tl": 0.005,  # (0.0011)
    "sce": 0.01,  # (0.0054)
    "sce_all": 0.01,  # (0.0044)
}
# mergekit's bf16 Karcher mean rounds each cosine between nearly parallel unit vectors to bf16 (a step of
# 0.004 near 1), so its angles are mostly rounding: 72% of its outputs are more than one step from the
# float32 computation's. Arcee Fusion's bf16 softmaxes and KL divergences move its threshold, flipping
# 14% of the mask. Both are compared with mergekit at float32 working precision instead, where Karcher
# agrees everywhere and Arcee Fusion but for 0.06% (mergekit's sampled quartiles on 2M-element tensors).
FLOAT32_WORK_ONLY = {"karcher": 0.0, "arcee_fusion": 0.005}
# The same bounds per tensor: the largest fraction in any one tensor (measured, in parentheses, with some
# margin). The pooled fractions above are 98% embedding and lm_head elements (vocabulary 32,000, hidden
# 64); the worst tensors are layer matrices, several times above the pooled fraction (model_stock: 0.014
# in one MLP matrix against 0.00005 pooled).
BF16_BEYOND_ONE_STEP_PER_TENSOR = {
    "arcee_fusion": 0.002,  # (0.0010, the embedding: mergekit's sampled quartiles)
    "breadcrumbs": 0.02,  # (0.0146)
    "breadcrumbs_ties": 0.025,  # (0.0186)
    "karcher": 0.0,  # (0)
    "model_stock": 0.02,  # (0.0137)
    "model_stock_filter_wise": 0.035,  # (0.0239)
    "multislerp": 0.035,  # (0.0258)
    "nearswap": 0.006,  # (0.0039)
    "nuslerp": 0.035,  # (0.0237)
    "nuslerp_rows": 0.05,  # (0.0381)
    "passthrough": 0.0,  # (0)
    "ram": 0.006,  # (0.0039)
    "ramplus_tl": 0.004,  # (0.0024)
    "sce": 0.02,  # (0.0150)
    "sce_all": 0.015,  # (0.0098)
}
# mergekit writes arcee_fusion and ramplus_tl bf16-recipe results as float32 even in bf16 recipes (their masks and
# amplification factors are float32 and promote the result); fusemerge writes the recipe's dtype.
MERGEKIT_WRITES_FLOAT32 = {"arcee_fusion", "ramplus_tl"}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_bfloat16_within_one_step_of_mergekit(method, mistral_bf16, tmp_path, write_recipe):
    text = RECIPES[method].format(dtype="bfloat16", **{k: str(v) for k, v in mistral_bf16.items()})
    ours = load_folder(
        run_merge(
            write_recipe(text), tmp_path / "ours", progress=False, echo=lambda _: None, engine="streaming"
        )
    )
    if method in FLOAT32_WORK_ONLY:
        text = text.replace("dtype: bfloat16", "dtype: float32\nout_dtype: bfloat16")
    theirs = load_folder(run_mergekit(text, tmp_path / "mergekit", seed=0))
    base = load_folder(mistral_bf16["base"])
    total = beyond = 0
    for name, expected in theirs.items():
        assert ours[name].dtype == torch.bfloat16, name
        float32_written = method in MERGEKIT_WRITES_FLOAT32 and method not in FLOAT32_WORK_ONLY
        assert expected.dtype == (torch.float32 if float32_written else torch.bfloat16), name
        steps = bf16_steps(ours[name], expected.to(torch.bfloat16), base[name])
        total += steps.numel()
        beyond += int((steps > 1).sum())
    bound = FLOAT32_WORK_ONLY.get(method, BF16_BEYOND_ONE_STEP.get(method))
    assert beyond / total <= bound, f"{beyond}/{total} elements more than one bf16 step apart"
    name, fraction = worst_tensor(beyond_one_step(ours, theirs, base))
    assert fraction <= BF16_BEYOND_ONE_STEP_PER_TENSOR[method], (
        f"{name}: {fraction:.4f} of its elements more than one bf16 step apart"
    )
