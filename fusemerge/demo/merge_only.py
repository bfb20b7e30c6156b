"""`fusemerge demo`: a real merge, fully offline, on models built on the spot.

    fusemerge demo --out demo-out

Three small Llama-architecture models share a real tokenizer (Mistral's, shipped in `mistral-common`): a
pivot, an "attention specialist" whose attention matrices moved away from it, and an "MLP specialist"
whose MLP matrices did. Merging them shows what VaRM does that a plain average does not: it weights each
matrix by how far each model moved it, so each specialist's change survives where it was made.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.reader import ModelFolder
from fusemerge.merge.api import run_merge
from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer, perturb_model

KINDS = {"attention": "self_attn", "MLP": "mlp"}


def run_demo(
    out: str | Path, *, progress: bool = True, echo: Callable[[str], Any] = print
) -> dict[str, dict[str, tuple[float, float]]]:
    """Build the models, merge them two ways, print how much of each specialist's change survived."""
    out = Path(out)
    models = out / "models"
    echo(f"building three small models in {models} (random weights, real Mistral tokenizer)")
    tokenizer = load_shipped_tokenizer("mistral")
    pivot = models / "pivot"
    if not (pivot / "config.json").is_file():
        build_random_model(
            pivot, vocab_size=32000, hidden_size=128, intermediate_size=384, num_layers=4, tokenizer=tokenizer
        )
    attention = perturb_model(pivot, models / "attention-specialist", scale=0.01, seed=1, only="self_attn")
    mlp = perturb_model(pivot, models / "mlp-specialist", scale=0.01, seed=2, only="mlp")

    results: dict[str, dict[str, tuple[float, float]]] = {}
    for method in ("variation_ratio", "linear"):
        recipe = out / f"{method}.yml"
        weights = "" if method == "variation_ratio" else "\n    parameters: {weight: 0.5}"
        recipe.write_text(
            f"merge_method: {method}\n"
            + (f"base_model: {pivot}\n" if method == "variation_ratio" else "")
            + f"models:\n  - model: {attention}{weights}\n  - model: {mlp}{weights}\n"
            + "dtype: float32\n"
        )
        merged = run_merge(recipe, out / f"merged-{method}", overwrite=True, progress=progress, echo=echo)
        results[method] = _retained(pivot, attention, mlp, merged)

    echo("")
    echo("share of each specialist's change that the merge kept (1.00 = all of it, 0.00 = none)")
    echo(f"{'matrices':<12} {'specialist':<11} {'VaRM':>6} {'linear':>7}")
    for kind in KINDS:
        for i, who in enumerate(("attention", "MLP")):
            varm, linear = results["variation_ratio"][kind][i], results["linear"][kind][i]
            echo(f"{kind:<12} {who:<11} {varm:>6.2f} {linear:>7.2f}")
    echo("")
    echo("VaRM keeps each specialist's change where it was made; the average halves both everywhere.")
    echo(f"merged models: {out / 'merged-variation_ratio'}, {out / 'merged-linear'}")
    return results


def _retained(pivot: Path, a: Path, b: Path, merged: Path) -> dict[str, tuple[float, float]]:
    """Per kind of matrix: <merged - pivot, x - pivot> / |x - pivot|^2 for each specialist x."""
    import torch

    folders = [ModelFolder(p) for p in (pivot, a, b, merged)]
    out: dict[str, tuple[float, float]] = {}
    for kind, key in KINDS.items():
        num = [0.0, 0.0]
        den = [0.0, 0.0]
        for name in folders[0].tensors:
            if key not in name:
                continue
            p, x, y, m = (f.read(name).double() for f in folders)
            for i, s in enumerate((x, y)):
                d = s - p
                num[i] += float(torch.dot((m - p).flatten(), d.flatten()))
                den[i] += float(torch.dot(d.flatten(), d.flatten()))
        out[kind] = tuple(n / d if d else 0.0 for n, d in zip(num, den, strict=True))  # type: ignore[assignment]
    for f in folders:
        f.close()
    return out
