"""Shared fixtures: tiny random models with real tokenizers, built in temporary folders (no network)."""

from __future__ import annotations

import pytest

from fusemerge.assets import load_shipped_tokenizer


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return load_shipped_tokenizer("gpt2")


@pytest.fixture(scope="session")
def mistral_tokenizer():
    return load_shipped_tokenizer("mistral")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return load_shipped_tokenizer("qwen3")
