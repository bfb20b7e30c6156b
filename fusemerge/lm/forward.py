"""The top-K forward: next-token log-probs at every real token, without whole-batch logits.

Both the teacher pass (top-K rows for the stores, metric_ce) and `fusemerge eval` (the log-prob of the
actual next token) run this one function, so a fused model is scored exactly as its teachers were read.
Logits are never materialised for the whole batch: the backbone's hidden states of the real (unpadded)
tokens go through the output head in row chunks of at most `logits_budget` values, and log_softmax/top-K
run in float32 per chunk, so a 150k-token vocabulary at 2,048 tokens x 8 sequences does not need 10 GB.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def topk_forward(lm: Any, input_ids: Any, attention_mask: Any, *, top_k: int, logits_budget: int):
    """Top-K next-token log-probs at every real position, and the log-prob of the actual next token.

    Returns (values float32 [n, K], ids int64 [n, K], next_logprob float32 [n]) over the real tokens of
    the batch in row-major order (sequence by sequence); next_logprob is NaN at each sequence's last token.
    `logits_budget` is the number of float32 logits (rows x vocab) held at once.
    """
    import torch

    real = attention_mask.bool()
    with torch.inference_mode():
        hidden, head = _hidden_states(lm, input_ids, attention_mask)
        hidden = hidden[real]  # [n, H]: padding never reaches the head
        nxt = torch.full_like(input_ids, -1)
        nxt[:, :-1] = input_ids[:, 1:]
        nxt = nxt.masked_fill(~torch.roll(real, -1, dims=1) | ~real, -1)
        nxt[:, -1] = -1
        targets = nxt[real]
        vocab = (
            lm.config.get_text_config().vocab_size
            if hasattr(lm.config, "get_text_config")
            else lm.config.vocab_size
        )
        rows = max(1, logits_budget // max(vocab, 1))
        values, ids, next_lp = [], [], []
        for a in range(0, hidden.shape[0], rows):
            logits = head(hidden[a : a + rows]).float()
            logp = torch.log_softmax(logits, dim=-1)
            v, i = logp.topk(top_k, dim=-1)
            t = targets[a : a + rows]
            lp = logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            values.append(v)
            ids.append(i)
            next_lp.append(lp.masked_fill(t < 0, float("nan")))
    return torch.cat(values), torch.cat(ids), torch.cat(next_lp)


def _hidden_states(lm: Any, input_ids: Any, attention_mask: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The last hidden states and a function that turns rows of them into logits, as the model would.

    Models that post-process logits (soft-capping, scaling) get the same treatment; a model without a
    separate backbone falls back to the full forward (its logits are then computed for the whole batch).
    """
    base = getattr(lm, "base_model", lm)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if base is lm or head is None:
        logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits, lambda x: x
    out = base(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale_div = getattr(config, "logits_scaling", None)  # granite
    scale_mul = getattr(config, "logit_scale", None)  # cohere

    def project(rows: Any) -> Any:
        logits = head(rows)
        if scale_mul is not None:
            logits = logits * scale_mul
        if scale_div is not None:
            logits = logits / scale_div
        if softcap is not None:
            logits = (logits / softcap).tanh() * softcap
        return logits

    return hidden, project
