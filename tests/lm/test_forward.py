"""The top-K forward never holds [batch, length, vocab] logits: a probe of every tensor it creates."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusemerge.lm.forward import topk_forward


class _Shapes(TorchDispatchMode):
    """Records (dtype, shape) of every tensor an aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((t.dtype, tuple(t.shape)))
        return out


def _tiny(architecture: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        architecture,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=architecture == "qwen2",
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_logits_are_made_in_chunks_of_the_budget(architecture):
    vocab, batch, length, rows = 3000, 4, 48, 16
    lm = _tiny(architecture, vocab)
    input_ids = torch.randint(0, vocab, (batch, length))
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[1, 30:] = 0  # padding never reaches the head either
    attention[3, 10:] = 0
    probe = _Shapes()
    with probe:
        values, ids, next_lp = topk_forward(lm, input_ids, attention, top_k=5, logits_budget=rows * vocab)
    real = int(attention.sum())
    assert values.shape == ids.shape == (real, 5) and next_lp.shape == (real,)
    with_vocab = [(dtype, shape) for dtype, shape in probe.seen if vocab in shape]
    assert with_vocab, "the probe saw no logits at all"
    biggest = max(torch.Size(shape).numel() for _, shape in with_vocab)
    assert biggest <= rows * vocab < batch * length * vocab
    assert all(len(shape) == 2 for _, shape in with_vocab)  # rows x vocab, never batch x length x vocab
    # and what the chunks give is what one whole-batch forward gives
    with torch.inference_mode():
        full = torch.log_softmax(lm(input_ids=input_ids, attention_mask=attention).logits.float(), -1)
    want = full[attention.bool()].topk(5, dim=-1)
    torch.testing.assert_close(values, want.values, rtol=1e-5, atol=1e-5)
