"""FLOPs of the fuse steps and the MFU they run at: one owner of the formulas, for the bench and the plan.

    from fusemerge.fuse.flops import ModelShape, step_flops, peak_tflops
    shape = ModelShape.from_config(AutoConfig.from_pretrained("meta-llama/Llama-3.2-1B"))
    step_flops(shape, lengths=[312, 88, 2048], kind="teacher")      # FLOPs of one teacher pass over them

What is counted (model FLOPs, as MFU is defined: the useful work, not what the kernels happened to do):
- Every matmul with a weight, 2 FLOPs per multiply-add, on *real* tokens only: padding is waste, so it
  lowers MFU instead of being counted as work. `N` = the weights of those matmuls per token (attention
  and MLP projections of every layer and the output head; the embedding lookup is not a matmul).
- Causal attention's two products (scores QK^T and the weighted sum with V): 2 * 2 * head_dim * heads
  FLOPs per (query, key) pair, over the L (L + 1) / 2 pairs of a causal sequence of L tokens.
- forward (teacher pass): 2N per token + attention.
- full training: forward + backward = 3 x forward (6N: the backward computes gradients for both the
  inputs and the weights of every matmul); with activation checkpointing the forward runs twice (8N).
- LoRA training: the frozen base runs forward and the input-gradient half of its backward (4N, no
  weight gradients), attention forward and backward as in full training, and the adapters train fully
  (6 x their weights per token). Checkpointing adds one more forward of everything.

Peak TFLOP/s: dense bf16 tensor-core figures from the vendors' data sheets (no sparsity), by a name
match on `torch.cuda.get_device_name()`; None where the device is not in the table (a CPU), and MFU is
then not reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["teacher", "full", "lora"]
UNGATED_MLP = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi")  # two MLP matrices, not three

# dense bf16 TFLOP/s, longest names first where one contains another
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM and NVL
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("T4", 65.0),  # fp16: the T4 has no bf16
)

# MFU per device class and stage, for `fuse --dry-run`'s time estimate. "measured" names the run that
# measured it; everything else is an assumption and says so. Issue 15's goals and the README's old 40%.
MFU_TABLE: dict[str, dict[str, Any]] = {
    "hopper": {  # H100 / H200
        "teacher": 0.40,
        "full": 0.40,
        "lora": 0.40,
        "source": "assumption (40%: no GPU run of bench/mfu_bench.py has measured it yet)",
    },
    "gpu": {
        "teacher": 0.40,
        "full": 0.40,
        "lora": 0.40,
        "source": "assumption (40% of the device's peak; not measured)",
    },
}
# Achieved FLOP/s on a CPU, where there is no peak to take a fraction of: bench/mfu_bench.py --size small
# (4 layers, hidden 512, float32), 2026-12-01, on 2 CPU cores shared with other jobs (load average ~15),
# so wall-clock rates several times below what 2 free cores give: an order of magnitude, stated as such.
CPU_TFLOPS: dict[str, Any] = {
    "teacher": 0.012,
    "full": 0.015,
    "lora": 0.009,
    "source": "measured by bench/mfu_bench.py --size small on 2 shared, loaded CPU cores; order of magnitude",
}
# The align step is CPU work without FLOPs: pivot tokens per CPU-second of one worker, dtw + stats,
# mistral -> qwen3 tokenizers on chat-length sequences (bench/align_bench.py --workers 2, 2026-12-01: 112k
# pivot tokens in 3.4 CPU-s; the wall clock was 4x that on the loaded machine). Workers scale it.
ALIGN_TOKENS_PER_S_PER_WORKER = 30_000.0


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a decoder-only transformer's config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True  # SwiGLU (Llama, Mistral, Qwen): three MLP matrices; GPT-2 style: two

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (Llama-style names, GPT-2's n_* names as a fallback)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()

        def get(*names: str, default: Any = None) -> Any:
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return value
            return default

        hidden = int(get("hidden_size", "n_embd", "d_model"))
        heads = int(get("num_attention_heads", "n_head"))
        kv = int(get("num_key_value_heads", default=heads))
        head_dim = int(get("head_dim", default=hidden // heads))
        intermediate = int(get("intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden)
        gated = getattr(config, "model_type", "") not in UNGATED_MLP
        return cls(
            layers=int(get("num_hidden_layers", "n_layer")),
            hidden=hidden,
            heads=heads,
            kv_heads=kv,
            head_dim=head_dim,
            intermediate=intermediate,
            vocab=int(get("vocab_size")),
            gated_mlp=gated,
        )

    @property
    def layer_weights(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o and the MLP."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attention + mlp

    @property
    def matmul_weights(self) -> int:
        """N: the weights every token goes through (all layers and the output head)."""
        return self.layers * self.layer_weights + self.hidden * self.vocab

    def lora_weights(self, r: int) -> int:
        """Adapter weights of rank r on every linear layer of the decoder ("all-linear": not the head)."""
        q_o = 2 * r * (self.hidden + self.heads * self.head_dim)
        k_v = 2 * r * (self.hidden + self.kv_heads * self.head_dim)
        mlp = (3 if self.gated_mlp else 2) * r * (self.hidden + self.intermediate)
        return self.layers * (q_o + k_v + mlp)


def attention_flops(shape: ModelShape, length: int) -> float:
    """Forward FLOPs of causal attention's two products over one sequence of `length` tokens."""
    pairs = length * (length + 1) / 2
    return 4.0 * shape.layers * shape.heads * shape.head_dim * pairs


def step_flops(
    shape: ModelShape,
    lengths: Iterable[int],
    kind: Kind,
    *,
    lora_r: int = 16,
    checkpointing: bool = False,
) -> float:
    """Model FLOPs of one pass of `kind` over sequences of these real lengths (see the module docstring)."""
    lengths = list(lengths)
    tokens = float(sum(lengths))
    n = float(shape.matmul_weights)
    attn = sum(attention_flops(shape, length) for length in lengths)
    forward = 2.0 * n * tokens + attn
    if kind == "teacher":
        return forward
    if kind == "full":
        return forward * (4.0 if checkpointing else 3.0)
    if kind == "lora":
        adapters = 6.0 * shape.lora_weights(lora_r) * tokens
        base = 4.0 * n * tokens + 3.0 * attn  # frozen: forward + input gradients; attention fully
        if checkpointing:
            base += forward
            adapters += 2.0 * shape.lora_weights(lora_r) * tokens
        return base + adapters
    raise ValueError(f"unknown kind {kind!r}")


def peak_tflops(device_name: str | None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s) by name, or None (a CPU, or a GPU not in the table)."""
    if not device_name:
        return None
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def device_class(device_name: str | None) -> str:
    """`hopper`, `gpu` or `cpu`: the row of `MFU_TABLE` an estimate for this device uses."""
    if not device_name or device_name == "cpu":
        return "cpu"
    return "hopper" if any(n in device_name for n in ("H100", "H200")) else "gpu"


@dataclass(frozen=True)
class Estimate:
    seconds: float | None
    basis: str  # how it was estimated, with "assumption" or "measured" in it


def estimate_seconds(flops: float, kind: Kind, device_name: str | None, gpus: int = 1) -> Estimate:
    """Time for `flops` of `kind` on the device, from `MFU_TABLE` (GPU) or `CPU_TFLOPS`."""
    cls = device_class(device_name)
    if cls == "cpu":
        rate = CPU_TFLOPS[kind] * 1e12
        return Estimate(flops / rate, f"{CPU_TFLOPS[kind]:g} TFLOP/s achieved, {CPU_TFLOPS['source']}")
    peak = peak_tflops(device_name)
    row = MFU_TABLE[cls]
    if peak is None:
        return Estimate(None, f"{device_name}: peak unknown (not in fusemerge.fuse.flops.PEAK_BF16_TFLOPS)")
    rate = peak * 1e12 * row[kind] * gpus
    what = f"{100 * row[kind]:.0f}% MFU of {peak:g} TFLOP/s" + (f" x {gpus} GPUs" if gpus > 1 else "")
    return Estimate(flops / rate, f"{what}, {row['source']}")


def padding_fraction(batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded positions of right-padded batches (lists of real lengths) that are padding."""
    padded = sum(max(b) * len(b) for b in batches if b)
    real = sum(sum(b) for b in batches)
    return 0.0 if padded == 0 else 1.0 - real / padded
