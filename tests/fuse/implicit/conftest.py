"""Fixtures for the implicit-fusion tests: tiny random chat models with 32k-id tokenizers (fast to sample
from on a CPU), a tiny sequence-classification reward model, and prompt files."""

from __future__ import annotations

from pathlib import Path

import pytest
from implicit_helpers import math_prompts, write_jsonl

from fusemerge.offline.assets import build_random_model, load_shipped_tokenizer


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is ~20x faster than two fighting for cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen32k():
    return load_shipped_tokenizer("qwen3-32k")


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory, qwen32k, mistral_tokenizer) -> dict[str, Path]:
    """A pivot and a source with Qwen3's template (32k ids), and a source whose tokenizer has no template."""
    root = tmp_path_factory.mktemp("implicit-models")
    common = {"vocab_size": len(qwen32k), "tokenizer": qwen32k, "tie_word_embeddings": True}
    return {
        "pivot": build_random_model(root / "pivot", architecture="qwen2", seed=11, **common),
        "qwen": build_random_model(root / "qwen-source", architecture="qwen2", seed=12, **common),
        "mistral": build_random_model(
            root / "mistral-source",
            architecture="mistral",
            vocab_size=len(mistral_tokenizer),
            tokenizer=mistral_tokenizer,
            tie_word_embeddings=True,
            seed=13,
        ),
    }


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, qwen32k) -> Path:
    """A random 2-layer Qwen2 sequence-classification model with one output: a stand-in reward model."""
    import torch
    from transformers import AutoModelForSequenceClassification, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(qwen32k),
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=qwen32k.pad_token_id,
        eos_token_id=qwen32k.eos_token_id,
    )
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_config(config)
    folder = tmp_path_factory.mktemp("reward-model") / "rm"
    model.save_pretrained(folder, safe_serialization=True)
    qwen32k.save_pretrained(folder)
    return folder


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", math_prompts(6))
