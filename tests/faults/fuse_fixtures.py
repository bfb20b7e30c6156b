"""Small models and recipes for the fuse side's fault tests (helpers imported by those modules).

The pivot carries Qwen3's byte-level BPE cut to 1k ids (a real chat template, no unknown bytes); the
source is a perturbed copy of it in another folder; `unk` is a word-level tokenizer of five words that
maps nearly every word of the data to `<unk>`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml
from click.testing import CliRunner

from fusemerge.cli import main
from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer, perturb_model
from fusemerge.offline.corpora import chatterbot_conversations

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


def word_level_tokenizer(words: list[str]):
    """A fast word-level tokenizer knowing `words` (whitespace-split); anything else is `<unk>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def build_fuse_models(root: Path) -> dict[str, Path]:
    """The models and data of these tests under `root` (a module fixture calls it: about a second)."""
    qwen = load_shipped_tokenizer("qwen3-1k")
    pivot = build_random_model(
        root / "pivot", architecture="qwen2", vocab_size=len(qwen), tokenizer=qwen, seed=1, **TINY
    )
    unk = word_level_tokenizer(["the", "a", "is"])
    notok = root / "no-tokenizer"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (notok / name).write_bytes((pivot / name).read_bytes())
    records = [{"messages": c["messages"]} for c in chatterbot_conversations()[:12]]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {
        "pivot": pivot,
        "source": perturb_model(pivot, root / "source", scale=0.05, seed=2),
        "unk": build_random_model(root / "unk", vocab_size=len(unk), tokenizer=unk, seed=3, **TINY),
        "no-tokenizer": notok,
        "data": data,
    }


def fuse_recipe(tmp_path: Path, models: dict[str, Path], **changes) -> Path:
    """A one-source recipe that trains one step on the CPU; `changes` replace top-level sections."""
    body = {
        "pivot": str(models["pivot"]),
        "sources": [str(models["source"])],
        "dataset": {"path": str(models["data"]), "limit": 6, "max_length": 128},
        "teacher": {"top_k": 4, "device": "cpu", "shard_size": 4},
        "training": {"mode": "full", "max_steps": 1, "batch_size": 2, "gradient_accumulation": 1},
        "output": str(tmp_path / "out"),
    }
    body.update(changes)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def run_fuse_cli(recipe: Path, *args: str):
    return CliRunner().invoke(main, ["fuse", str(recipe), "-q", *args])


def teacher_stores(out: Path) -> list[Path]:
    """The teacher stores a run started (any folder under work/teacher/): none if it stopped up front."""
    root = out / "work" / "teacher"
    return sorted(root.iterdir()) if root.is_dir() else []


def try_mount_tmpfs(where: Path, *options: str) -> bool:
    """Mount a tmpfs at `where` (root in a container can; most users cannot): True if it worked."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)], capture_output=True
    )
    return done.returncode == 0


def unmount(where: Path) -> None:
    """Unmount, lazily if a file on it is still open (a failed torch.save's writer, held by the traceback a
    test inspects): a plain umount then fails "target is busy" and leaves the mount, and its folder
    undeletable, behind."""
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)
