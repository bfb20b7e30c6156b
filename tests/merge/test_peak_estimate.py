"""The dry run's memory estimate counts what the method's code path really holds.

On the CPU the numba kernels select TIES' and SCE's top-k by a radix select over histograms (SCE
recomputes each variance in every pass), so neither holds a whole-tensor temporary there; the torch
paths (another device) still hold |delta| and a copy, 8 bytes per element.
"""

from __future__ import annotations

import pytest

from fusemerge.merge.plan import build_plan
from fusemerge.merge.recipe import read_recipe


def _whole_tensor(monkeypatch) -> None:
    """Estimates of the whole-tensor engine, even for a plan the elementwise stream would run."""
    from fusemerge.merge import elementwise

    monkeypatch.setattr(elementwise, "streamable", lambda *a: False)


def _plan(method: str, refs: dict[str, str], write_recipe, params: str = ""):
    recipe = write_recipe(
        f"merge_method: {method}\nbase_model: {refs['base']}\nmodels:\n"
        f"  - model: {refs['ft1']}\n    parameters: {{weight: 0.5{params}}}\n"
        f"  - model: {refs['ft2']}\n    parameters: {{weight: 0.5{params}}}\n"
    )
    return build_plan(read_recipe(recipe).loaded, out_shard_size=1 << 30, warn=lambda _: None)


@pytest.mark.parametrize(("method", "params"), [("sce", ""), ("ties", ", density: 0.5")])
def test_kernel_selections_hold_no_whole_tensor_temporary_on_cpu(
    method, params, llama_fp32, write_recipe, monkeypatch
):
    _whole_tensor(monkeypatch)
    refs = {k: str(v) for k, v in llama_fp32.items()}
    plan = _plan(method, refs, write_recipe, params)
    reference = _plan("task_arithmetic", refs, write_recipe)  # same inputs, no selection at all
    largest = max(t.numel for t in plan.tasks)
    assert plan.peak_memory_estimate() == reference.peak_memory_estimate()
    assert plan.peak_memory_estimate(device="cuda") == reference.peak_memory_estimate() + 8 * largest


def test_dare_counts_its_packed_mask_bits_on_cpu(llama_fp32, write_recipe, monkeypatch):
    _whole_tensor(monkeypatch)
    refs = {k: str(v) for k, v in llama_fp32.items()}
    plan = _plan("dare_ties", refs, write_recipe, ", density: 0.5")
    reference = _plan("task_arithmetic", refs, write_recipe)
    worst = max(plan.tasks, key=lambda t: t.numel)
    bits = len(worst.inputs) * ((worst.numel + 7) // 8)
    assert plan.peak_memory_estimate() == reference.peak_memory_estimate() + bits


def test_a_streamed_elementwise_merge_is_estimated_at_its_chunk_buffers(mistral_bf16, write_recipe):
    from fusemerge.merge import elementwise

    refs = {k: str(v) for k, v in mistral_bf16.items()}
    plan = _plan("task_arithmetic", refs, write_recipe)
    # base + two models read a chunk each, two result chunks: bf16, 2 bytes an element
    assert plan.peak_memory_estimate() == 5 * elementwise.CHUNK_ELEMENTS * 2
    assert plan.peak_memory_estimate(device="cuda") > 5 * elementwise.CHUNK_ELEMENTS * 2
