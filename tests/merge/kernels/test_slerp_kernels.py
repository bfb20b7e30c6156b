"""SLERP's numba path gives the torch path's bits (the torch path is what equals mergekit)."""

from __future__ import annotations

import pytest
import torch

import fusemerge.merge.methods.slerp as slerp_module

N = 2 * slerp_module.SLERP_CHUNK + 12_345  # three chunks, the last one short
KINDS = ["apart", "close", "finetune", "zero"]
DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def _pair(kind: str, dtype: torch.dtype, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(KINDS.index(kind) * 10 + DTYPES.index(dtype))
    a = torch.randn(n, generator=g) * 0.02
    if kind == "apart":
        b = torch.randn(n, generator=g) * 0.03
    elif kind == "close":  # |cos| > 0.9995: the linear fallback
        b = a + torch.randn(n, generator=g) * 1e-5
    elif kind == "finetune":  # a fine-tune: cos just below 1, where acos amplifies any error
        b = a + torch.randn(n, generator=g) * 0.002
    else:  # a zero tensor: its norm is taken as 1
        b = torch.zeros(n)
    return a.to(dtype), b.to(dtype)


def _reference(a: torch.Tensor, b: torch.Tensor, t: float, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(slerp_module, "use_kernels", lambda *_: False)
        return slerp_module.slerp([b], a, t=t)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.35, 1.0])
def test_native_slerp_equals_torch_path(kind, dtype, t, monkeypatch):
    a, b = _pair(kind, dtype)
    fast = slerp_module.slerp([b], a, t=t)
    reference = _reference(a, b, t, monkeypatch)
    if dtype == torch.bfloat16:
        # written in bf16 directly, rounded as the engine's cast of the float32 result
        assert fast.dtype == torch.bfloat16
        reference = reference.to(torch.bfloat16)
    assert fast.shape == a.shape
    assert torch.equal(
        fast.view(torch.int16 if fast.itemsize == 2 else torch.int32),
        reference.view(torch.int16 if reference.itemsize == 2 else torch.int32),
    )


def test_native_slerp_keeps_shape_and_small_tensors(monkeypatch):
    a, b = (x.reshape(7, 11) for x in _pair("apart", torch.bfloat16, 77))
    fast = slerp_module.slerp([b], a, t=0.6)
    assert fast.shape == (7, 11)
    assert torch.equal(fast, _reference(a, b, 0.6, monkeypatch).to(torch.bfloat16))


def test_native_slerp_matches_mergekit_on_bf16():
    """The bf16 result equals mergekit's slerp (float32 arithmetic, stored into a bf16 tensor)."""
    mk = pytest.importorskip("mergekit.merge_methods.slerp")
    a, b = _pair("finetune", torch.bfloat16)
    theirs = mk.slerp(torch.tensor([0.35]), a.reshape(1, -1), b.reshape(1, -1)).reshape(-1)
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(slerp_module.slerp([b], a, t=0.35), theirs)


@pytest.mark.parametrize("threads", [2, 3, 4, 5, 8, 16])
def test_torch_sum_equals_threaded_sum(threads):
    """The serial emulation of torch's two-pass reduction gives `x.sum()`'s bits at that thread count."""
    g = torch.Generator().manual_seed(threads)
    sizes = [1 << 20, (1 << 20) - 17, 12_345, 32_768, 32_769, 65_537, 98_305, 300_001]
    xs = [torch.randn(n, generator=g) * (0.1 + 3 * float(torch.rand(1, generator=g))) for n in sizes * 3]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        reference = [x.sum() for x in xs]
        torch.set_num_threads(1)
        serial = [x.sum() for x in xs]
        emulated = [slerp_module.torch_sum(x, threads) for x in xs]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(e, r) for e, r in zip(emulated, reference, strict=True))
    # the point of the emulation: a plain serial sum does not give these bits
    assert any(not torch.equal(s, r) for s, r in zip(serial, reference, strict=True))


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_native_slerp_equals_torch_path_at_any_thread_count(threads, monkeypatch):
    a, b = _pair("finetune", torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fast = slerp_module.slerp([b], a, t=0.35)
        assert torch.get_num_threads() == threads  # restored
        reference = _reference(a, b, 0.35, monkeypatch).to(torch.bfloat16)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(fast, reference)
