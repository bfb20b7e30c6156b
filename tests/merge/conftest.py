"""Families of tiny models for merge tests: a base and perturbed 'fine-tunes', Llama fp32 and Mistral bf16."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusemerge.offline.assets import build_random_model, perturb_model

# Perturbation (std, fraction of elements) of each 'fine-tune'; weights themselves have std 0.02.
FP32_DELTAS = [(0.02, 1.0), (0.05, 0.5), (0.01, 0.3)]
# bf16 fine-tunes move weights by a few percent: larger deltas would be unlike real checkpoints and would
# make bf16 rounding, not the method, dominate comparisons.
BF16_DELTAS = [(0.002, 1.0), (0.005, 0.5), (0.001, 0.3)]


def _family(root: Path, *, architecture: str, dtype: str, tokenizer, vocab: int, deltas) -> dict[str, Path]:
    base = build_random_model(
        root / "base", architecture=architecture, vocab_size=vocab, tokenizer=tokenizer, seed=0, dtype=dtype
    )
    models = {"base": base}
    for i, (scale, fraction) in enumerate(deltas, start=1):
        models[f"ft{i}"] = perturb_model(base, root / f"ft{i}", scale=scale, seed=i, fraction=fraction)
    return models


@pytest.fixture(scope="session")
def llama_fp32(tmp_path_factory, mistral_tokenizer) -> dict[str, Path]:
    return _family(
        tmp_path_factory.mktemp("llama_fp32"),
        architecture="llama",
        dtype="float32",
        tokenizer=mistral_tokenizer,
        vocab=32000,
        deltas=FP32_DELTAS,
    )


@pytest.fixture(scope="session")
def mistral_bf16(tmp_path_factory, mistral_tokenizer) -> dict[str, Path]:
    return _family(
        tmp_path_factory.mktemp("mistral_bf16"),
        architecture="mistral",
        dtype="bfloat16",
        tokenizer=mistral_tokenizer,
        vocab=32000,
        deltas=BF16_DELTAS,
    )


@pytest.fixture()
def write_recipe(tmp_path):
    def write(text: str, name: str = "recipe.yml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
