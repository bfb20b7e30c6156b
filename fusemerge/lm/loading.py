"""Loading tokenizers and causal LMs under one policy: no pickle, no remote code, 4-bit only on a GPU.

- Pickle: `.bin`/`.pt` weights can run code when loaded, so a local folder without `*.safetensors` is
  refused unless the caller allows pickle, and transformers is told to use safetensors only.
- Remote code: `trust_remote_code` is passed through as the caller says, never switched on here.
- 4-bit: bitsandbytes on a CUDA device; the quantization settings are the caller's (`FourBit`), because the
  teacher pass and QLoRA training use different ones today.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.layout import PICKLE_SUFFIXES
from fusemerge.errors import FusemergeError


@dataclass(frozen=True)
class FourBit:
    """bitsandbytes 4-bit weights: `BitsAndBytesConfig(load_in_4bit=True, ...)` with these settings."""

    compute_dtype: str  # float32 | bfloat16 | float16: the dtype the dequantized matmuls run in
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True


# Any of these in a model folder can define a vocabulary; a folder with none has no tokenizer of its own.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)
# A few words every tokenizer with a vocabulary encodes to at least one token.
PROBE_TEXT = "Hello, world"


def load_tokenizer(model: str, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (a folder or a Hub id); a one-line error when it cannot be loaded.

    A folder without tokenizer files is refused here: transformers 5 then builds an empty tokenizer from
    config.json alone, which fails much later (`cannot reshape tensor of 0 elements`), after a hint about
    chat templates that sends the user the wrong way.
    """
    from transformers import AutoTokenizer

    folder = Path(model)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FusemergeError(
            f"no tokenizer files in this model folder ({', '.join(TOKENIZER_FILES[:3])}, ...): "
            "copy them from the model it was made from",
            file=model,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FusemergeError(f"cannot load the tokenizer: {first_line(exc)}", file=model) from exc
    if not tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise FusemergeError(
            f"the tokenizer is empty (it encodes {PROBE_TEXT!r} to no tokens): its files are incomplete",
            file=model,
        )
    return tokenizer


def check_weights(model: str, *, allow_pickle: bool, option: str = "set allow_pickle: true") -> None:
    """Refuse a local folder that has no `*.safetensors` weights unless pickle is allowed.

    `option` is how the caller's user allows pickle: the recipe key (fuse) or `pass --allow-pickle` (eval).
    """
    folder = Path(model)
    if folder.is_dir() and not allow_pickle and not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (
            f"only pickle weights ({', '.join(pickled[:3])}); {option} if you trust them"
            if pickled
            else "no *.safetensors weights"
        )
        raise FusemergeError(hint, file=folder)


def four_bit_config(quant: FourBit, *, cuda: bool, option: str, no_gpu: str, **where: Any) -> Any:
    """The `quantization_config` for 4-bit loading; a one-line error without a GPU or bitsandbytes.

    Args:
        quant: the quantization settings.
        cuda: whether the model goes to a CUDA device.
        option: the recipe option that asked for it, for the install hint ("load_in_4bit", "qlora").
        no_gpu: the whole message when there is no GPU.
        where: `file=` or `key=` of the error.
    """
    import torch

    if not cuda:
        raise FusemergeError(no_gpu, **where)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise FusemergeError(f"{option} needs bitsandbytes: pip install bitsandbytes", **where) from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
    )


def load_causal_lm(
    model: str,
    *,
    dtype: str,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    device_map: Any = None,
    progress: bool = True,
    what: str = "the model",
) -> Any:
    """`AutoModelForCausalLM.from_pretrained` under the pickle policy; placement and mode are the caller's.

    Args:
        model: local folder or Hub id.
        dtype: a torch dtype name ("float32", "bfloat16", "float16").
        allow_pickle: accept pickle weights (they can run code when loaded).
        trust_remote_code: run the model's own Python code from the Hub.
        quantization_config, device_map: passed to transformers when given (4-bit: `four_bit_config`).
        progress: False hides transformers' "Loading weights" bar for this load.
        what: names the model in the error ("cannot load the pivot: ...").
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_weights(model, allow_pickle=allow_pickle)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "trust_remote_code": trust_remote_code,
        "use_safetensors": None if allow_pickle else True,
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        raise FusemergeError(f"cannot load {what}: {first_line(exc)}", file=model) from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def resolve_device(device: str) -> str:
    """'auto' is the accelerate process's device (its own GPU under `accelerate launch`, else cpu)."""
    if device != "auto":
        return device
    from accelerate import PartialState

    return str(PartialState().device)


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' is bfloat16 on a GPU and float32 on the CPU."""
    return ("bfloat16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line errors (transformers' messages run to paragraphs)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
