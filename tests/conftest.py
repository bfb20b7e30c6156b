"""Shared fixtures: tiny random models with real tokenizers, built in temporary folders (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusemerge.assets import build_random_model, load_shipped_tokenizer, perturb_model


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return load_shipped_tokenizer("gpt2")


@pytest.fixture(scope="session")
def mistral_tokenizer():
    return load_shipped_tokenizer("mistral")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return load_shipped_tokenizer("qwen3")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, mistral_tokenizer) -> dict[str, Path]:
    """A float32 Llama-architecture base and three perturbed 'fine-tunes' of it, with a real tokenizer."""
    root = tmp_path_factory.mktemp("family")
    base = build_random_model(root / "base", vocab_size=32000, tokenizer=mistral_tokenizer, seed=0)
    models = {"base": base}
    for i, (scale, fraction) in enumerate([(0.02, 1.0), (0.05, 0.5), (0.01, 0.3)], start=1):
        models[f"ft{i}"] = perturb_model(base, root / f"ft{i}", scale=scale, seed=i, fraction=fraction)
    return models
