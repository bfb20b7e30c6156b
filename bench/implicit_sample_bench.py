"""CPU benchmark of `sample`: samples/s and generated tokens/s of the transformers backend.

    PYTHONPATH=. python bench/implicit_sample_bench.py OUT_DIR [--hidden 64 --layers 2 --vocab qwen3-32k]

A random model built on the spot with a real tokenizer answers `--prompts` prompts `--samples` times each,
`--max-new-tokens` tokens at most (a random model seldom stops early, so nearly every sample is that long:
the rate is the backend's, not a property of the answers). One JSON line per batch size. Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fuse" / "implicit"))
from implicit_helpers import math_prompts, write_jsonl  # noqa: E402


def main() -> None:
    import torch

    from fusemerge.fuse.implicit.prompts import read_prompts
    from fusemerge.fuse.implicit.sample import SampleModel, run_sample
    from fusemerge.fuse.implicit.spec import SamplingSpec
    from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", default="qwen3-32k")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_shipped_tokenizer(args.vocab)  # type: ignore[arg-type]
    model = build_random_model(
        out / "model",
        vocab_size=len(tok),
        tokenizer=tok,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_layers=args.layers,
        tie_word_embeddings=True,
        seed=1,
    )
    prompts = read_prompts(path=str(write_jsonl(out / "prompts.jsonl", math_prompts(args.prompts))))
    for batch in args.batch:
        folder = out / f"samples-b{batch}"
        shutil.rmtree(folder, ignore_errors=True)
        spec = SamplingSpec(samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=batch)
        report = run_sample(
            model=SampleModel(name="bench", model=str(model), chat_template="chatml"),
            prompts=prompts,
            spec=spec,
            folder=folder,
            progress=False,
            echo=lambda _: None,
        )
        print(
            json.dumps(
                {
                    "bench": "sample",
                    "hidden": args.hidden,
                    "layers": args.layers,
                    "vocab": len(tok),
                    "threads": args.threads,
                    "batch_prompts": batch,
                    "samples": report.samples,
                    "seconds": round(report.seconds, 2),
                    "samples_per_s": round(report.samples_per_s, 2),
                    "tokens_per_s": round(report.tokens / report.seconds, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
