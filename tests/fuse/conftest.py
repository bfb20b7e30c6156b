"""Fixtures for the fuse tests: real chat data (chatterbot corpus) as JSONL and tiny models with real tokenizers.

The pivot carries the Qwen3 tokenizer (it has a chat template); the sources carry GPT-2 and Mistral
tokenizers, so every model reads the same pivot-rendered text with a different tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusemerge.fuse.store import TopKStore
from fusemerge.lm.tokens import ChatTokenizer
from fusemerge.offline.corpora import chatterbot_conversations


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat_records(count: int, *, start: int = 0) -> list[dict]:
    """Real chatterbot conversations in OpenAI form, spread over the corpus's topics."""
    convs = chatterbot_conversations()
    step = max(1, len(convs) // (count + start))
    return [{"messages": c["messages"]} for c in convs[start * step :: step][:count]]


def make_store(
    path: Path,
    data,
    tokenizer,
    *,
    k: int = 4,
    seed: int = 0,
    aligned: bool = False,
    shard_size: int = 8,
    ce_offset: float = 0.0,
) -> TopKStore:
    """A finished top-K store in the pivot's positions, written directly with the TopKStore API.

    Rows list the gold next token first (a teacher that mostly knows the data) then random pivot ids;
    an aligned store (the align step's contract) also has empty slots (-1) and rows with no distribution.
    """
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    tok = ChatTokenizer(tokenizer)
    identity = {"kind": "aligned" if aligned else "teacher", "top_k": k, "seed": seed, "vocab": "pivot"}
    store = TopKStore.create_or_resume(path, identity, n_sequences=len(data.sequences), shard_size=shard_size)
    for shard in range(store.n_shards):
        ids_list, lps_list, ces, per_byte = [], [], [], []
        for i in store.shard_sequences(shard):
            ids, _ = tok(data.sequences[i])
            rows = len(ids)
            top = rng.integers(0, vocab, size=(rows, k)).astype(np.int32)
            top[:-1, 0] = ids[1:]
            lps = np.sort(np.log(rng.dirichlet(np.ones(k), size=rows)), axis=1)[:, ::-1]
            if aligned:
                top[rng.random((rows, k)) < 0.2] = -1
                top[rng.random(rows) < 0.1] = -1
                lps = np.where(top >= 0, lps, -np.inf)
            ids_list.append(top)
            lps_list.append(lps.astype(np.float16))
            ces.append(float(rng.uniform(1.0, 3.0)) + ce_offset)
            per_byte.append(ces[-1] / 3.0)  # as if every token were 3 bytes
        store.write_shard(shard, ids_list, lps_list, ces, ce_per_byte=per_byte)
    store.finalize()
    return TopKStore.open(path)


def write_recipe(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    """40 real conversations, one per line."""
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_records(40))


@pytest.fixture(scope="session")
def fuse_helpers():
    """The helper functions above, for tests (conftest modules are not imported by name)."""

    class Helpers:
        write_jsonl = staticmethod(write_jsonl)
        chat_records = staticmethod(chat_records)
        write_recipe = staticmethod(write_recipe)
        make_store = staticmethod(make_store)

    return Helpers
