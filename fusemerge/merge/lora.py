"""`model+lora` references: a peft LoRA adapter folded into its base model on the fly, tensor by tensor.

Reading tensor W of the base gives W + B @ A * scale for the modules the adapter targets (scale =
lora_alpha / r, or / sqrt(r) with rsLoRA; `rank_pattern`/`alpha_pattern` per module), in float32 and
rounded once to W's dtype; embeddings take (B @ A)^T * scale, and weights the adapter saved whole
(`base_layer.weight`, written by peft when embeddings are targeted) replace the base's. Nothing is
written to disk: mergekit instead loads the whole model, merges with peft and saves a copy first.

The adapter is checked when the reference is opened, before any tensor is read: its config, that every
adapter tensor is one we understand, and that each A/B pair fits its base tensor's shape. DoRA and
`modules_to_save` adapters are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusemerge.checkpoint.reader import ModelFolder
from fusemerge.errors import FusemergeError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<ab>lora_[AB])(?:\.[^.]+)?\.weight|(?P<emb>lora_embedding_[AB])(?:\.[^.]+)?|"
    r"(?P<whole>base_layer\.weight))$"
)


@dataclass(frozen=True)
class _Fold:
    a: str
    b: str
    scale: float
    embedding: bool
    fan_in_fan_out: bool


class LoraModel(ModelFolder):
    """A base model folder whose `read` folds a LoRA adapter into the tensors it targets."""

    def __init__(self, base: Path, adapter: Path, *, allow_pickle: bool = False) -> None:
        super().__init__(base, allow_pickle=allow_pickle)
        self.adapter_path = Path(adapter)
        config = _adapter_config(self.adapter_path)
        self.adapter = ModelFolder(self.adapter_path)
        self.extra_files = sorted({info.file for info in self.adapter.tensors.values()})
        self.folds: dict[str, _Fold] = {}
        self.replaced: dict[str, str] = {}
        self._plan_folds(config)

    def _plan_folds(self, config: dict[str, Any]) -> None:
        pairs: dict[str, dict[str, str]] = {}
        for key in self.adapter.tensors:
            name = key.removeprefix(PREFIX)
            match = _KEY.match(name)
            if match is None:
                raise FusemergeError(
                    "adapter tensor is not a LoRA A/B weight (modules_to_save and other extras are not "
                    "supported)",
                    file=self.adapter_path,
                    tensor=key,
                )
            module = match["module"]
            if match["whole"]:
                self.replaced[f"{module}.weight"] = key
                continue
            part = (match["ab"] or match["emb"])[-1]
            pairs.setdefault(module, {})[part] = key
            if match["emb"]:
                pairs[module]["embedding"] = "1"
        for module, pair in pairs.items():
            if "A" not in pair or "B" not in pair:
                raise FusemergeError(
                    f"LoRA module '{module}' lacks its A or B weight", file=self.adapter_path
                )
            target = f"{module}.weight"
            info = self.tensors.get(target)
            if info is None:
                raise FusemergeError(
                    f"the adapter targets '{target}', which the base model {self.path} does not have",
                    file=self.adapter_path,
                )
            a, b = self.adapter.tensors[pair["A"]].shape, self.adapter.tensors[pair["B"]].shape
            embedding = "embedding" in pair
            fan = bool(config.get("fan_in_fan_out")) and not embedding
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise FusemergeError(
                    f"LoRA A {list(a)} and B {list(b)} do not pair", file=self.adapter_path, tensor=target
                )
            folded = (a[1], b[0]) if embedding or fan else (b[0], a[1])
            if tuple(info.shape) != folded:
                raise FusemergeError(
                    f"LoRA delta of shape {list(folded)} does not fit the base tensor's {list(info.shape)}",
                    file=self.adapter_path,
                    tensor=target,
                )
            self.folds[target] = _Fold(pair["A"], pair["B"], _scale(config, module, a[0]), embedding, fan)
        for target, key in self.replaced.items():
            info = self.tensors.get(target)
            if info is None or tuple(info.shape) != tuple(self.adapter.tensors[key].shape):
                raise FusemergeError(
                    "the adapter's saved base weight does not match the base model's",
                    file=self.adapter_path,
                    tensor=key,
                )

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        tensor = self.adapter.read(self.replaced[name]) if name in self.replaced else super().read(name, out)
        fold = self.folds.get(name)
        if fold is None:
            return tensor
        a = self.adapter.read(fold.a).to(torch.float32)
        b = self.adapter.read(fold.b).to(torch.float32)
        delta = b @ a
        if fold.embedding or fold.fan_in_fan_out:
            delta = delta.T
        work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        return (tensor.to(work) + delta.to(work) * fold.scale).to(tensor.dtype)

    def close(self) -> None:
        super().close()
        if hasattr(self, "adapter"):
            self.adapter.close()


def _adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FusemergeError(f"not a peft adapter folder (no {ADAPTER_CONFIG})", file=adapter) from None
    except (OSError, ValueError) as exc:
        raise FusemergeError(f"unreadable adapter config ({exc})", file=path) from None
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise FusemergeError(
            f"only LoRA adapters can be folded in, not {peft_type}", file=path, key="peft_type"
        )
    if config.get("use_dora"):
        raise FusemergeError("DoRA adapters are not supported (magnitude vectors)", file=path, key="use_dora")
    if config.get("modules_to_save"):
        raise FusemergeError(
            "adapters with modules_to_save are not supported", file=path, key="modules_to_save"
        )
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise FusemergeError("adapter config lacks a positive rank 'r'", file=path, key="r")
    return config


def _pattern_value(patterns: dict[str, Any] | None, module: str) -> Any:
    """peft's rank_pattern / alpha_pattern: a key matches a module name ending in it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return None


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module) or config.get("lora_alpha", 8)
    r = _pattern_value(config.get("rank_pattern"), module) or config["r"]
    if r != rank:
        raise FusemergeError(f"LoRA module '{module}' has rank {rank} but its config says {r}", key="r")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
