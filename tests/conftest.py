"""Shared fixtures: tiny random models with real tokenizers, built in temporary folders (no network)."""

from __future__ import annotations

import os
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


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs two workers on two cores) each worker computes on one thread.

    Two workers each running torch's default of one thread per core would oversubscribe the cores (and
    OpenMP threads spin while they wait); the environment variable carries the same limit into the CLI
    runs that tests start as subprocesses.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)


# The longest tests (minutes each on two cores): under pytest-xdist each starts one worker's share, so that
# they run side by side from the start and the short tests fill in around them. `--dist worksteal` first
# gives each worker a contiguous block of the collection; stealing only moves tests not yet started.
LONGEST_FIRST = (
    "tests/demo/test_fusion_demo.py::test_full_demo_shows_what_fusechat_predicts",
    "tests/demo/test_implicit_demo.py::test_full_demo_shows_what_fusechat3_predicts",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # set in each worker, which collects
    if workers < 2:
        return  # one process: the default order (fixtures set up once per module) is the fastest
    longest = [item for name in LONGEST_FIRST for item in items if item.nodeid == name]
    rest = [item for item in items if item not in longest]
    block = -(-len(items) // workers)  # the size of each worker's first block
    for i, item in enumerate(longest):
        rest.insert(min((i % workers) * block, len(rest)), item)
    items[:] = rest
