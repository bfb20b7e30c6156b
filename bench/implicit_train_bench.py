"""CPU benchmark of the training half: pairs/s of `preference` and peak memory of `preference` vs `sft`.

    PYTHONPATH=. python bench/implicit_train_bench.py OUT_DIR [--hidden 64 --layers 2 --vocab gpt2]

Each measurement runs in its own process (peak RSS is per process: `ru_maxrss`), on a random model built
on the spot with a real tokenizer; the numbers go to stdout as one JSON line per run. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fuse" / "implicit"))
from train_helpers import make_recipe, preference_rows, sft_rows, write_jsonl  # noqa: E402


def one_run(args: argparse.Namespace) -> None:
    import torch
    from transformers import TrainerCallback

    from fusemerge.fuse.implicit.datasets import read_preference_data, read_sft_data
    from fusemerge.fuse.implicit.preference import run_preference
    from fusemerge.fuse.implicit.sft import run_sft
    from fusemerge.fuse.implicit.spec import DataFileSpec

    class Runtime(TrainerCallback):
        def on_train_end(self, args_, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

        def on_train_begin(self, args_, state, control, **kwargs):
            self.start = time.perf_counter()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    recipe = make_recipe(str(out / "pivot"), mode=args.mode, steps=args.steps, loss=args.loss, max_length=256)
    recipe = type(recipe)(
        pivot=recipe.pivot,
        training=recipe.training.model_copy(update={"batch_size": args.batch, "save_steps": 10_000}),
        implicit=recipe.implicit.model_copy(
            update={"preference": recipe.implicit.preference.model_copy(update={"batch_size": args.batch})}
        ),
    )
    runtime = Runtime()
    name = f"{args.stage}-{args.loss}-{args.mode}"
    if args.stage == "sft":
        records = read_sft_data(spec=DataFileSpec(path=str(out / "sft.jsonl")))
        run_sft(recipe=recipe, records=records, out=out / name, checkpoints=out / f"ck-{name}",
                max_length=256, progress=False, echo=lambda _: None, callbacks=[runtime])  # fmt: skip
    else:
        pairs = read_preference_data(spec=DataFileSpec(path=str(out / "preference.jsonl")))
        run_preference(recipe=recipe, pairs=pairs, out=out / name, checkpoints=out / f"ck-{name}",
                       progress=False, echo=lambda _: None, callbacks=[runtime])  # fmt: skip
    examples = args.steps * args.batch
    print(json.dumps({
        "run": name,
        "threads": args.threads,
        "examples": examples,
        "train_s": round(runtime.seconds, 2),
        "per_s": round(examples / runtime.seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", default="gpt2", choices=["gpt2", "qwen3-32k"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--one", nargs=3, metavar=("STAGE", "LOSS", "MODE"))
    parser.add_argument("--mode", default="full")
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--stage", default="preference")
    # tiny matmuls: on a busy CPU more threads only wait for each other
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.one:
        args.stage, args.loss, args.mode = args.one
        one_run(args)
        return
    from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_shipped_tokenizer(args.vocab)
    model = build_random_model(
        out / "pivot",
        vocab_size=len(tok),
        tokenizer=tok,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_layers=args.layers,
        tie_word_embeddings=True,
        seed=1,
    )
    n_params = sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters()
    )
    print(
        json.dumps(
            {"model_params": n_params, "hidden": args.hidden, "layers": args.layers, "vocab": len(tok)}
        )
    )
    write_jsonl(out / "sft.jsonl", sft_rows(args.steps * args.batch))
    write_jsonl(out / "preference.jsonl", preference_rows(args.steps * args.batch))
    runs = [("sft", "dpo", "full"), ("preference", "dpo", "full"), ("preference", "ln_dpo", "full"),
            ("preference", "wrpo", "full"), ("sft", "dpo", "lora"), ("preference", "dpo", "lora")]  # fmt: skip
    for run in runs:
        cmd = [
            sys.executable,
            __file__,
            str(out),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--threads",
            str(args.threads),
            "--one",
            *run,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else f"{run}: failed\n{result.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
