"""The fused numba kernels give the same results as the plain torch path they replace."""

from __future__ import annotations

import numpy as np
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


def _family(n: int, count: int, seed: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    models = [base + torch.randn(n, generator=g) * 0.002 for _ in range(count)]
    return [m.to(dtype) for m in models], base.to(dtype)


def _without_kernels(monkeypatch, *modules) -> None:
    for module in modules:
        monkeypatch.setattr(module, "use_kernels", lambda *_: False)


def test_dare_bits_are_the_torch_path_draws():
    """The kernels' packed DARE mask is RandomKeep.mask's, chunk by chunk (so seeds give the draws they
    gave before), across a chunk boundary at an offset that is not a whole byte of bits."""
    from fusemerge.merge.kernels.chunks import CHUNK_ELEMENTS, spans

    n = CHUNK_ELEMENTS + 12_345
    models, base = _family(n, 1, seed=5, dtype=torch.bfloat16)
    keep = masks.RandomKeep(seed=99, density=0.3)
    held = masks.kernel_masks([models[0]], base, [keep], norms=True)
    unpacked = torch.from_numpy(np.unpackbits(held.bits[0], bitorder="little")[:n].astype(bool))
    delta = (models[0].float() - base.float()).abs()
    expected = torch.cat([keep.mask(delta[span], span) for span in spans(n)])
    assert torch.equal(unpacked, expected)
    before, after = held.norms[0]
    assert before == pytest.approx(float(delta.sum(dtype=torch.float64)), rel=1e-12)
    assert after == pytest.approx(float((delta * expected).sum(dtype=torch.float64)), rel=1e-12)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_kernels_equal_torch_path(method, dtype, monkeypatch):
    from fusemerge.merge.methods import get_method

    m = get_method(method)
    models, base = _family(1_000_003, 3, seed=11, dtype=dtype)
    kwargs = {key: p.default for key, p in m.shared.items()}
    kwargs |= {"weight": [0.5, -0.3, 0.8], "density": [0.4, 0.7, 1.0], "seed": 123, "normalize": True}
    fused = m.fn(models, base, **kwargs)
    # The kernels write bf16 directly for bf16 inputs (the torch path returns float32).
    assert fused.dtype == dtype
    _without_kernels(monkeypatch, masks, ta)
    reference = m.fn([t.float() for t in models], base.float(), **kwargs)
    assert torch.equal(fused != 0, reference.to(dtype) != 0)  # the same elements were dropped
    if method == "dare_ties" or dtype == torch.float32:
        # TIES' sums run in the same order on both paths; the linear sum may fuse a multiply-add.
        torch.testing.assert_close(fused.float(), reference.to(dtype).float(), rtol=1e-6, atol=1e-7)
    else:
        differ = fused.float() != reference.to(dtype).float()
        assert float(differ.float().mean()) < 1e-4  # one bf16 step, where a float32 sum sits on a tie


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("topk", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sce_kernels_equal_torch_path_bit_for_bit(count, topk, dtype, monkeypatch):
    import fusemerge.merge.methods.sce as sce

    models, base = _family(1_000_003, count, seed=21 + count, dtype=dtype)
    fused = sce.sce(models, base, int8_mask=False, select_topk=topk)
    assert fused.dtype == dtype  # written in the input dtype directly, no float32 tensor
    _without_kernels(monkeypatch, sce, masks)
    reference = sce.sce(models, base, int8_mask=False, select_topk=topk)
    assert torch.equal(fused, reference.to(dtype))


def test_sce_selection_ties_go_to_the_lowest_indices(monkeypatch):
    """Quantized deltas tie the variance threshold heavily; both paths keep the same tied elements."""
    import fusemerge.merge.methods.sce as sce

    base = _quantized(2_000_003, seed=31)[1]
    models = [_quantized(2_000_003, seed=s)[0] for s in (32, 33)]
    fused = sce.sce(models, base, int8_mask=False, select_topk=0.37)
    _without_kernels(monkeypatch, sce, masks)
    reference = sce.sce(models, base, int8_mask=False, select_topk=0.37)
    assert torch.equal(fused, reference.to(fused.dtype))


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_one_tuple_kernel_equals_the_per_model_kernels_bit_for_bit(method):
    """Linear and unmasked task arithmetic inputs of one dtype go to the kernels as a tuple (the sum in
    registers); mixed dtypes take the per-model kernels. The same values (bf16 widened exactly to float32 for one model) must give the
    same bits either way."""
    from fusemerge.merge.methods import get_method

    m = get_method(method)
    models, base = _family(1_000_003, 3, seed=41, dtype=torch.bfloat16)
    mixed = [models[0].float(), *models[1:]]
    kwargs = {key: p.default for key, p in m.shared.items()} | {"weight": [0.5, -0.3, 0.8]}
    if method != "linear":
        kwargs |= {"density": [0.4, 0.7, 1.0]}
    if m.random:
        kwargs["seed"] = 5
    bases = (None, None) if method == "linear" else (base, base.float())
    one_dtype = m.fn(models, bases[0], **kwargs)
    per_model = m.fn(mixed, bases[1], **kwargs)
    assert one_dtype.dtype == torch.bfloat16 and per_model.dtype == torch.float32
    assert torch.equal(one_dtype, per_model.to(torch.bfloat16))


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**62 + 12_345])
def test_kernel_draws_are_torch_rand_draws(seed):
    """The kernel's MT19937 is torch's CPU generator: its keep flags are torch.rand(...) < density for
    seeds above 32 bits too, over several of MT's 624-word blocks."""
    from fusemerge.merge.kernels import cpu

    n = 10_007
    gen = torch.Generator()
    gen.manual_seed(seed)
    expected = (torch.rand(n, generator=gen) < 0.37).numpy()
    x = np.zeros(n, dtype=np.float32)
    bits = np.zeros((n + 7) // 8 + 1, dtype=np.uint8)
    cpu.draw_kept_seeded(x, x, seed, np.float32(0.37), bits, 3)  # at a bit offset, as a later chunk is
    kept = np.unpackbits(bits, bitorder="little")[3 : 3 + n].astype(bool)
    assert np.array_equal(kept, expected)


@pytest.mark.parametrize("n", [1, 623, 624, 625, 5000])
@pytest.mark.parametrize("offset", [0, 3, 16])
def test_kernel_draws_and_norms_at_block_edges_and_extreme_densities(n, offset):
    """Draws are made one MT block (624) at a time and compared as integers: equal to torch.rand < density
    across block edges, at byte-aligned and unaligned offsets, for densities at and beyond [0, 1]; the L1
    norms equal float64 sums."""
    from fusemerge.merge.kernels import cpu

    x = np.random.default_rng(n + offset).standard_normal(n).astype(np.float32)
    for density in (0.0, -0.5, 0.3, 1.0, 1.5, float(np.nextafter(np.float32(1), np.float32(0)))):
        gen = torch.Generator()
        gen.manual_seed(77)
        expected = (torch.rand(n, generator=gen) < float(np.float32(density))).numpy()
        bits = np.zeros((offset + n + 7) // 8 + 1, dtype=np.uint8)
        before, after = cpu.draw_kept_seeded(x, np.zeros_like(x), 77, np.float32(density), bits, offset)
        kept = np.unpackbits(bits, bitorder="little")
        assert np.array_equal(kept[offset : offset + n].astype(bool), expected), density
        assert not kept[:offset].any() and not kept[offset + n :].any()
        magnitude = np.abs(x.astype(np.float64))
        assert before == pytest.approx(magnitude.sum(), rel=1e-12)
        assert after == pytest.approx(magnitude[expected].sum(), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize(("offset", "n"), [(0, 8 * 37), (16, 8 * 37 + 5), (3, 101)])
def test_kept_delta_bits_reads_the_packed_mask_at_any_offset(offset, n):
    """The byte-wise unrolled loop (chunks starting on a byte) and the per-element one agree with a
    numpy reference, remainders included."""
    from fusemerge.merge.kernels import cpu

    rng = np.random.default_rng(offset + n)
    x, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    bits = rng.integers(0, 256, (offset + n + 7) // 8 + 1, dtype=np.uint8)
    kept = np.unpackbits(bits, bitorder="little")[offset : offset + n].astype(np.float32)
    out = np.empty(n, dtype=np.float32)
    cpu.kept_delta_bits(x, b, bits, offset, np.float32(0.7), out)
    expected = (x - b) * np.float32(0.7) * kept
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))
