"""The streaming engine against mergekit 0.1.5 on the same recipes (gradients, filters, per-model weights).

float32 recipes must match to float32 rounding. For bfloat16 recipes mergekit does task arithmetic and
TIES in bf16 while fusemerge computes in float32 and rounds once, so those may differ by one bf16 step on
a small fraction of elements (the bound is asserted below); linear and slerp compute in float32 in both.
"""

from __future__ import annotations

import pytest
import torch

from tests.merge.oracle import beyond_one_step, bf16_steps, load_folder, merge_both, worst_tensor

RECIPES = {
    "linear": """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {ft2}
    parameters:
      weight:
        - filter: self_attn
          value: 0.7
        - value: 0.3
  - model: {ft3}
    parameters: {{weight: 0.25}}
dtype: {dtype}
""",
    "linear_unnormalized": """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
parameters: {{normalize: false}}
dtype: {dtype}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [1.0, 0.5, 0.2]}}
  - model: {ft2}
    parameters:
      weight:
        - filter: mlp
          value: 0.9
        - value: 0.4
parameters: {{lambda: 0.8}}
dtype: {dtype}
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [0.3, 0.7], density: 0.5}}
  - model: {ft2}
    parameters:
      weight:
        - filter: self_attn
          value: 0.8
        - value: 0.4
      density: 0.7
  - model: {ft3}
    parameters: {{weight: 0.5, density: [0.9, 0.3]}}
dtype: {dtype}
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {ft2}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: {dtype}
""",
}


def _merge_both(family, method, dtype, tmp_path, write_recipe):
    return merge_both(RECIPES[method], family, dtype, tmp_path, write_recipe)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_float32_equals_mergekit(method, llama_fp32, tmp_path, write_recipe):
    ours, theirs = _merge_both(llama_fp32, method, "float32", tmp_path, write_recipe)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == torch.float32, name
        torch.testing.assert_close(ours[name], expected, rtol=2e-6, atol=2e-7, msg=name)


# The largest fraction of elements allowed more than one bf16 step apart. linear and slerp compute in
# float32 in both engines. mergekit rounds task-arithmetic/TIES weights, deltas, sign votes and sums to
# bf16, and breaks ties at the TIES density threshold arbitrarily (argsort); measured here: task
# arithmetic about 0.3%, TIES about 1.1% of elements.
BF16_BEYOND_ONE_STEP = {
    "linear": 0.0,
    "linear_unnormalized": 0.0,
    "slerp": 0.0,
    "task_arithmetic": 0.01,
    "ties": 0.02,
}
# The same, per tensor: the largest fraction in any one tensor (measured on the Mistral bf16 family, in
# parentheses, with some margin; the worst tensors are layer matrices of 2,048 to 8,192 elements, where
# the pooled fraction above is 98% embedding and lm_head).
BF16_BEYOND_ONE_STEP_PER_TENSOR = {
    "linear": 0.0,
    "linear_unnormalized": 0.0,
    "slerp": 0.0,
    "task_arithmetic": 0.015,  # (0.0095)
    "ties": 0.02,  # (0.0146)
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_bfloat16_within_one_step_of_mergekit(method, mistral_bf16, tmp_path, write_recipe):
    ours, theirs = _merge_both(mistral_bf16, method, "bfloat16", tmp_path, write_recipe)
    base = load_folder(mistral_bf16["base"])
    total = beyond = 0
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == torch.bfloat16, name
        steps = bf16_steps(ours[name], expected, base[name])
        total += steps.numel()
        beyond += int((steps > 1).sum())
    assert beyond / total <= BF16_BEYOND_ONE_STEP[method], (
        f"{beyond}/{total} elements more than one bf16 step apart"
    )
    name, fraction = worst_tensor(beyond_one_step(ours, theirs, base))
    assert fraction <= BF16_BEYOND_ONE_STEP_PER_TENSOR[method], (
        f"{name}: {fraction:.4f} of its elements more than one bf16 step apart"
    )
