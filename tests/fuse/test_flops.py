"""The FLOP formulas shared by bench/mfu_bench.py and `fuse --dry-run` (fusemerge.fuse.flops)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fusemerge.fuse.flops import (
    ModelShape,
    attention_flops,
    estimate_seconds,
    padding_fraction,
    peak_tflops,
    step_flops,
)

LLAMA_1B = SimpleNamespace(  # meta-llama/Llama-3.2-1B's config.json, the keys that matter
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
)


def test_llama_1b_weights_are_its_published_size():
    shape = ModelShape.from_config(LLAMA_1B)
    # 1.236B parameters in all: the matmul weights are all of them but the (tied) embedding, counted once
    # as the head; norms are 2 x 2048 per layer, not matmuls
    assert shape.matmul_weights == 16 * (2048 * 64 * (2 * 32 + 2 * 8) + 3 * 2048 * 8192) + 2048 * 128256
    assert 1.23e9 < shape.matmul_weights + 16 * 2 * 2048 + 2048 < 1.24e9


def test_gpt2_has_two_mlp_matrices():
    gpt2 = SimpleNamespace(
        model_type="gpt2", n_embd=768, n_head=12, n_layer=12, n_inner=None, vocab_size=50257
    )
    shape = ModelShape.from_config(gpt2)
    assert not shape.gated_mlp and shape.intermediate == 3072
    assert shape.matmul_weights == 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257  # 124M less embeddings


def test_training_is_three_forwards_and_lora_counts_frozen_work_honestly():
    shape = ModelShape.from_config(LLAMA_1B)
    lengths = [100, 2048, 7]
    tokens, n = sum(lengths), shape.matmul_weights
    attn = sum(attention_flops(shape, x) for x in lengths)
    assert attention_flops(shape, 1) == 4 * 16 * 32 * 64  # one query, one key
    forward = step_flops(shape, lengths, "teacher")
    assert forward == 2 * n * tokens + attn
    assert step_flops(shape, lengths, "full") == pytest.approx(3 * forward)
    assert step_flops(shape, lengths, "full", checkpointing=True) == pytest.approx(4 * forward)
    lora = step_flops(shape, lengths, "lora", lora_r=16)
    assert lora == pytest.approx(4 * n * tokens + 3 * attn + 6 * shape.lora_weights(16) * tokens)
    assert 4 * n * tokens < lora < 6 * n * tokens + 3 * attn


def test_peaks_and_estimates_say_what_they_assume():
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("cpu") is None
    gpu = estimate_seconds(989e12 * 0.4 * 10, "teacher", "NVIDIA H200")
    assert gpu.seconds == pytest.approx(10) and "assumption" in gpu.basis
    assert estimate_seconds(1e12, "full", "Some Future GPU").seconds is None
    assert "measured" in estimate_seconds(1e12, "full", "cpu").basis


def test_padding_fraction():
    assert padding_fraction([[4, 4], [2, 1]]) == pytest.approx(1 - 11 / 12)
    assert padding_fraction([]) == 0.0
