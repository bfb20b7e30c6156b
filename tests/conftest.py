"""Shared fixtures: tiny random models with real tokenizers, built in temporary folders (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer


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
def tiny_models(tmp_path_factory, qwen_tokenizer, gpt2_tokenizer, mistral_tokenizer) -> dict[str, Path]:
    """Random 2-layer models (hidden 64, tied embeddings) carrying the three real tokenizers (fuse and GPU tests)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "qwen": build_random_model(
            root / "qwen-pivot",
            architecture="qwen2",
            vocab_size=len(qwen_tokenizer),
            tokenizer=qwen_tokenizer,
            tie_word_embeddings=True,
            seed=1,
        ),
        "gpt2": build_random_model(
            root / "gpt2-source",
            vocab_size=len(gpt2_tokenizer),
            tokenizer=gpt2_tokenizer,
            tie_word_embeddings=True,
            seed=2,
        ),
        "mistral": build_random_model(
            root / "mistral-source",
            architecture="mistral",
            vocab_size=len(mistral_tokenizer),
            tokenizer=mistral_tokenizer,
            tie_word_embeddings=True,
            seed=3,
        ),
    }
