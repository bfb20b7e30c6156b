"""The whole recipe is checked before any tensor is read: these mistakes fail a --dry-run already."""

from __future__ import annotations

import pytest

from fusemerge.errors import FusemergeError
from fusemerge.merge.api import run_merge


def _dry(recipe, tmp_path, **options):
    run_merge(recipe, tmp_path / "out", dry_run=True, echo=lambda _: None, **options)


def test_zero_sum_linear_weights_fail_at_plan_time(llama_fp32, tmp_path, write_recipe):
    recipe = write_recipe(
        f"merge_method: linear\nmodels:\n  - model: {llama_fp32['ft1']}\n    parameters: {{weight: [1, 0]}}\n"
        f"  - model: {llama_fp32['ft2']}\n    parameters: {{weight: [-1, 0.5]}}\n"
    )
    with pytest.raises(FusemergeError, match="sum to zero") as info:
        _dry(recipe, tmp_path)
    assert info.value.tensor is not None  # names the first tensor (at layer 0) where it happens


def test_models_of_different_architectures_fail_at_plan_time(
    llama_fp32, mistral_bf16, tmp_path, write_recipe
):
    recipe = write_recipe(
        f"merge_method: linear\nmodels:\n  - model: {llama_fp32['ft1']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {mistral_bf16['ft1']}\n    parameters: {{weight: 1}}\n"
    )
    with pytest.raises(FusemergeError, match="MistralForCausalLM"):
        _dry(recipe, tmp_path)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ("{select_topk: lots}", "expected float"),
        # unused parameters are errors under --strict (tests/merge/test_recipe_compat.py: warnings without)
        ("{select_top_k: 0.5}", "not used by 'sce'"),
        ("{t: 0.5}", "not used by 'sce'"),
    ],
)
def test_bad_parameters_fail_at_plan_time(params, match, llama_fp32, tmp_path, write_recipe):
    refs = {k: str(v) for k, v in llama_fp32.items()}
    recipe = write_recipe(
        f"merge_method: sce\nbase_model: {refs['base']}\nmodels:\n  - model: {refs['ft1']}\n"
        f"  - model: {refs['ft2']}\nparameters: {params}\n"
    )
    with pytest.raises(FusemergeError, match=match):
        _dry(recipe, tmp_path, strict=True)
