"""The fused numba kernels give the same results as the plain torch path they replace."""

from __future__ import annotations

import pytest
import torch

import fusemerge.merge.methods.task_arithmetic as ta
import fusemerge.merge.sparsify as masks


def _quantized(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-like deltas: few distinct magnitudes, so the density threshold is heavily tied."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    model = (base.float() + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16)
    return model, base


@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.97])
def test_radix_selection_equals_kthvalue(density, monkeypatch):
    model, base = _quantized(5_000_003, seed=int(density * 1000))
    fast = ta._magnitude_keep(model, base, density)
    monkeypatch.setattr(masks, "use_kernels", lambda *_: False)
    monkeypatch.setattr(ta, "use_kernels", lambda *_: False)
    exact = ta._magnitude_keep(model, base, density)
    assert fast.threshold == exact.threshold
    # Both keep exactly k elements; the 'keep every tie' marker may be n or the last tie's index.
    delta = (model.float() - base.float()).abs()
    k = max(1, int(density * delta.numel()))
    for keep in (fast, exact):
        assert int(keep.mask(delta, slice(0, delta.numel())).sum()) == k
    assert torch.equal(fast.mask(delta, slice(0, delta.numel())), exact.mask(delta, slice(0, delta.numel())))


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_fused_combine_equals_torch_path(method, monkeypatch):
    base = _quantized(3_000_001, seed=1)[1]
    models = [_quantized(3_000_001, seed=s)[0] for s in (2, 3, 4)]
    models = [(base.float() + (m.float() - m.float().mean()) * 0.1).to(torch.bfloat16) for m in models]
    kwargs = {
        "weight": [0.5, -0.3, 0.8],
        "density": [0.4, 0.7, 1.0],
        "normalize": True,
        "rescale": True,
        "int8_mask": False,
        "lambda": 0.9,
    }
    fn = getattr(ta, method)
    fused = fn([m.float() for m in models], base.float(), **kwargs)
    monkeypatch.setattr(masks, "use_kernels", lambda *_: False)
    monkeypatch.setattr(ta, "use_kernels", lambda *_: False)
    reference = fn([m.float() for m in models], base.float(), **kwargs)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_bf16_results_are_rounded_exactly_like_torch(method, monkeypatch):
    """With bf16 inputs the kernels write bf16 directly; it must equal float32 result .to(bfloat16)."""
    import fusemerge.merge.kernels.chunks as chunks
    from fusemerge.merge.methods.linear import linear

    base = _quantized(1_000_003, seed=7)[1]
    models = [_quantized(1_000_003, seed=s)[0] for s in (8, 9)]
    if method == "linear":
        fused = linear([base, *models], None, weight=[0.2, 0.5, 0.3], normalize=True)
        reference = chunks.weighted_sum([t.float() for t in (base, *models)], [0.2, 0.5, 0.3], 1.0)
    else:
        kwargs = {
            "weight": [0.6, 0.4],
            "density": [0.5, 0.8],
            "normalize": True,
            "rescale": False,
            "int8_mask": False,
            "lambda": 1.0,
        }
        fn = getattr(ta, method)
        fused = fn(models, base, **kwargs)
        reference = fn([m.float() for m in models], base.float(), **kwargs)
    assert fused.dtype == torch.bfloat16
    assert torch.equal(fused, reference.to(torch.bfloat16))
