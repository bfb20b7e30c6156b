"""Merge with the Python API instead of the CLI: build three tiny models, plan, merge, inspect.

    python examples/merge_with_python_api.py [OUT_DIR]

Runs offline in a few seconds on a CPU (needs the `demo` extra for the tokenizer).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fusemerge.merge.api import run_merge
from fusemerge.merge.options import MergeOptions
from fusemerge.merge.plan import build_plan, describe
from fusemerge.merge.recipe import load_recipe
from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer, perturb_model


def main(out: Path) -> None:
    tokenizer = load_shipped_tokenizer("mistral")
    pivot = build_random_model(out / "pivot", vocab_size=32000, tokenizer=tokenizer)
    chat = perturb_model(pivot, out / "chat-tuned", scale=0.01, seed=1)
    code = perturb_model(pivot, out / "code-tuned", scale=0.01, seed=2, only="mlp")

    recipe = out / "varm.yml"
    recipe.write_text(
        f"merge_method: variation_ratio\nbase_model: {pivot}\n"
        f"models:\n  - model: {chat}\n  - model: {code}\n"
        "parameters: {granularity: matrix}\ndtype: bfloat16\n"
    )
    # The plan is checked whole before any tensor is read; describe() is what --dry-run prints.
    print(describe(build_plan(load_recipe(recipe), out_shard_size=5 * 10**9)))
    merged = run_merge(recipe, out / "merged", MergeOptions(overwrite=True, out_shard_size=4 * 10**6))
    print(sorted(p.name for p in merged.iterdir()))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("example-out"))
