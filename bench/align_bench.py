"""Token alignment speed on real conversations: compiled dtw and offsets vs a pure-Python MinED DP.

    PYTHONPATH=. python bench/align_bench.py            # 1,000 chatterbot conversations, two pairs
    PYTHONPATH=. python bench/align_bench.py --conversations 200 --python-subset 20

    PYTHONPATH=. python bench/align_bench.py --workers 16   # run_align: the speedup of 16 workers over 1

Prints one JSON line per measurement. Tokenization is done up front and not timed: the aligners get
token strings (dtw) or offset mappings (offsets), as the teacher pass hands them over. The pure-Python DP
is the reference's recurrence written plainly (a double loop calling rapidfuzz's C Levenshtein per cell);
it is timed on a subset and its rate per pivot token extrapolated, which the JSON says. `dtw` is timed
both as one call per conversation and as one `dtw_alignment_batch` call for all of them (`dtw_batch`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein

from fusemerge.fuse.align import (
    TokenizerProfile,
    dtw_alignment,
    dtw_alignment_batch,
    offsets_alignment,
    tokenize,
)
from fusemerge.offline.assets import load_shipped_tokenizer
from fusemerge.offline.corpora import chatterbot_conversations

PAIRS = [("mistral", "qwen3"), ("gpt2", "mistral")]  # (source, pivot)


def python_dp(source: list[str], pivot: list[str], source_marker: str, pivot_marker: str) -> list[list[int]]:
    """MinED DP + walk back, straightforwardly in Python (the reference's algorithm)."""
    inf = float("inf")
    s = [t.replace(source_marker, "") for t in source]
    p = [t.replace(pivot_marker, "") for t in pivot]
    n, m = len(s), len(p)
    d = [[inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            a, b = s[i], p[j]
            cost = Levenshtein.distance(a, b) * (0.1 if a in b or b in a else 1)
            d[i + 1][j + 1] = cost + min(d[i][j + 1], d[i + 1][j], d[i][j])
    out: list[list[int]] = [[] for _ in range(m)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        out[j].append(i)
        diag = d[i][j] if i > 0 and j > 0 else inf
        up = d[i][j + 1] if i > 0 else inf
        left = d[i + 1][j] if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    out[0].append(0)
    return [x[::-1] for x in out]


def conversations(count: int) -> list[str]:
    convs = chatterbot_conversations("english")
    if len(convs) < count:  # top up with other languages to reach `count` real conversations
        for language in ("spanish", "german", "portuguese", "italian", "russian", "chinese"):
            convs += chatterbot_conversations(language)
    return ["\n".join(m["content"] for m in c["messages"]) for c in convs[:count]]


def fake_teacher_store(folder: Path, name: str, tokenizer, data, seed: int):
    """A complete teacher store for `data` as `tokenizer` reads it: random top-10 rows (what align
    does with them costs the same as with a model's), the identity the align step checks."""
    from fusemerge.fuse.store import TopKStore
    from fusemerge.fuse.teacher import tokenizer_hash
    from fusemerge.lm.tokens import ChatTokenizer

    rng = np.random.default_rng(seed)
    chat = ChatTokenizer(tokenizer)
    identity = {
        "kind": "teacher",
        "positions": "model",
        "vocab": "model",
        "model": name,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset_hash": data.fingerprint(),
        "top_k": 10,
    }
    store = TopKStore.create_or_resume(folder, identity, n_sequences=len(data.sequences), shard_size=256)
    for shard in range(store.n_shards):
        ids, lps, ces = [], [], []
        for i in store.shard_sequences(shard):
            rows = len(chat(data.sequences[i])[0])
            ids.append(rng.integers(0, len(tokenizer), (rows, 10)).astype(np.int32))
            lps.append(np.sort(np.log(rng.dirichlet(np.ones(10), rows)), axis=1)[:, ::-1].astype(np.float16))
            ces.append(float(rng.uniform(1, 3)))
        store.write_shard(shard, ids, lps, ces, ce_per_byte=[c / 3 for c in ces])  # synthetic: ~3 bytes/token
    store.finalize()
    return store


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def workers_speedup(conversations: int, workers: int, tokens: str, vocab: str, join: int = 10) -> dict:
    """`run_align` end to end (tokenize, count, build the mapping, transfer, write) with 1 and with
    `workers` workers on real chat: the speedup, and whether every file came out the same."""
    import tempfile

    from fusemerge.fuse.aligned import run_align
    from fusemerge.fuse.data import build_chat_data
    from fusemerge.fuse.recipe import DatasetSpec

    convs = chatterbot_conversations("english")
    for language in ("spanish", "german", "portuguese", "italian", "russian", "chinese"):
        if len(convs) >= conversations:
            break
        convs += chatterbot_conversations(language)
    convs = (convs * -(-conversations // len(convs)))[:conversations]  # the corpus again where it ends
    source_tok, pivot_tok = load_shipped_tokenizer("mistral"), load_shipped_tokenizer("qwen3")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jsonl = root / "chat.jsonl"
        # `join` real conversations per record: chat-set lengths (hundreds of tokens), not 40-token exchanges
        records = [
            {"messages": [m for c in convs[k : k + join] for m in c["messages"]]}
            for k in range(0, len(convs), join)
        ]
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        data = build_chat_data(DatasetSpec(path=str(jsonl)), pivot_tok)
        pivot = fake_teacher_store(root / "pivot", "pivot", pivot_tok, data, 0)
        source = fake_teacher_store(root / "source", "source", source_tok, data, 1)
        seconds, cpu, files = {}, {}, {}
        for w in (1, workers):
            out = root / f"w{w}"
            before = _cpu_seconds()
            start = time.perf_counter()
            run_align(
                source_tok,
                pivot_tok,
                data,
                source_store=source.path,
                pivot_store=pivot.path,
                aligned_dir=out / "aligned",
                mapping_file=out / "map.safetensors",
                tokens=tokens,
                vocab=vocab,
                workers=w,
                progress=False,
                echo=lambda _: None,
            )
            seconds[w] = time.perf_counter() - start
            cpu[w] = _cpu_seconds() - before
            files[w] = {p.name: p.read_bytes() for p in sorted((out / "aligned").iterdir())}
        pivot_tokens = pivot.n_tokens()
    return {
        "method": "run_align_workers",
        "tokens": tokens,
        "vocab": vocab,
        "sequences": len(data.sequences),
        "conversations_per_sequence": join,
        "pivot_tokens": pivot_tokens,
        "workers": workers,
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "seconds_1_worker": round(seconds[1], 2),
        f"seconds_{workers}_workers": round(seconds[workers], 2),
        "pivot_tokens_per_s_per_worker_1": round(pivot_tokens / seconds[1]),
        "cpu_seconds_1_worker": round(cpu[1], 2),
        f"cpu_seconds_{workers}_workers": round(cpu[workers], 2),  # parent + workers: the parallel overhead
        "load_average_1min": round(os.getloadavg()[0], 2),
        "speedup": round(seconds[1] / seconds[workers], 2),
        "speedup_per_worker": round(seconds[1] / seconds[workers] / workers, 2),
        "same_store_as_1_worker": files[1] == files[workers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--python-subset", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=None, help="only: run_align with 1 vs this many workers (the speedup)"
    )
    parser.add_argument("--tokens", default="dtw", help="with --workers: alignment.tokens")
    parser.add_argument("--vocab", default="stats", help="with --workers: alignment.vocab")
    parser.add_argument("--join", type=int, default=10, help="with --workers: conversations per sequence")
    args = parser.parse_args()
    if args.workers:
        print(
            json.dumps(workers_speedup(args.conversations, args.workers, args.tokens, args.vocab, args.join)),
            flush=True,
        )
        return
    texts = conversations(args.conversations)
    names = {n for pair in PAIRS for n in pair}
    toks = {n: load_shipped_tokenizer(n) for n in names}
    profiles = {n: TokenizerProfile.from_tokenizer(t) for n, t in toks.items()}
    common = {"conversations": len(texts), "threads": 1, "cpu_count": os.cpu_count()}
    dtw_alignment(["a"], ["a"], source_marker="", pivot_marker="")  # compile outside the timings
    offsets_alignment(np.array([[0, 1]]), np.array([[0, 1]]), text="a")
    for source, pivot in PAIRS:
        s_all = [tokenize(toks[source], t, profile=profiles[source]) for t in texts]
        p_all = [tokenize(toks[pivot], t, profile=profiles[pivot]) for t in texts]
        pivot_tokens = sum(len(p) for p in p_all)
        sm, pm = profiles[source].marker, profiles[pivot].marker
        pair = {"source": source, "pivot": pivot, "pivot_tokens": pivot_tokens, **common}

        best = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for s, p in zip(s_all, p_all, strict=True):
                offsets_alignment(
                    s.offsets, p.offsets, text=p.text, source_weights=s.weights, pivot_weights=p.weights
                )
            best = min(best, time.perf_counter() - t0)
        print(
            json.dumps(
                {
                    "method": "offsets",
                    **pair,
                    "seconds": round(best, 4),
                    "pivot_tokens_per_s": round(pivot_tokens / best),
                }
            ),
            flush=True,
        )

        best = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fast = [
                dtw_alignment(s.tokens, p.tokens, source_marker=sm, pivot_marker=pm)
                for s, p in zip(s_all, p_all, strict=True)
            ]
            best = min(best, time.perf_counter() - t0)
        single_rate = pivot_tokens / best
        print(
            json.dumps(
                {
                    "method": "dtw",
                    "calls": "one per conversation",
                    **pair,
                    "seconds": round(best, 4),
                    "pivot_tokens_per_s": round(single_rate),
                }
            ),
            flush=True,
        )

        best = np.inf
        token_pairs = [(s.tokens, p.tokens) for s, p in zip(s_all, p_all, strict=True)]
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            batched = dtw_alignment_batch(token_pairs, source_marker=sm, pivot_marker=pm)
            best = min(best, time.perf_counter() - t0)
        dtw_rate = pivot_tokens / best
        print(
            json.dumps(
                {
                    "method": "dtw_batch",
                    "calls": "one for all conversations",
                    **pair,
                    "seconds": round(best, 4),
                    "pivot_tokens_per_s": round(dtw_rate),
                    "same_alignment_as_dtw": all(
                        a.to_lists() == b.to_lists() for a, b in zip(batched, fast, strict=True)
                    ),
                }
            ),
            flush=True,
        )

        step = max(1, len(texts) // args.python_subset)
        subset = list(range(0, len(texts), step))[: args.python_subset]
        sub_tokens = sum(len(p_all[k]) for k in subset)
        t0 = time.perf_counter()
        slow = {k: python_dp(s_all[k].tokens, p_all[k].tokens, sm, pm) for k in subset}
        seconds = time.perf_counter() - t0
        same = all(slow[k] == fast[k].to_lists() for k in subset)
        py_rate = sub_tokens / seconds
        print(
            json.dumps(
                {
                    "method": "python_dp",
                    **pair,
                    "pivot_tokens": sub_tokens,
                    "timed_conversations": len(subset),
                    "extrapolated": True,
                    "seconds": round(seconds, 4),
                    "pivot_tokens_per_s": round(py_rate),
                    "same_alignment_as_dtw": same,
                    "dtw_speedup": round(single_rate / py_rate, 1),
                    "dtw_batch_speedup": round(dtw_rate / py_rate, 1),
                }
            ),
            flush=True,
        )

    # Per-call overhead (tens of microseconds of Python around the compiled kernel) dominates
    # 30-token conversations unless they are batched; at teacher-pass lengths the quadratic DP dominates. Ten conversations
    # joined (about 400 tokens), both sides timed in full, nothing extrapolated.
    source, pivot = PAIRS[0]
    joined = ["\n".join(texts[k : k + 10]) for k in range(0, min(len(texts), 200), 10)]
    s_all = [tokenize(toks[source], t, profile=profiles[source]) for t in joined]
    p_all = [tokenize(toks[pivot], t, profile=profiles[pivot]) for t in joined]
    sm, pm = profiles[source].marker, profiles[pivot].marker
    pivot_tokens = sum(len(p) for p in p_all)
    t0 = time.perf_counter()
    fast = [
        dtw_alignment(s.tokens, p.tokens, source_marker=sm, pivot_marker=pm)
        for s, p in zip(s_all, p_all, strict=True)
    ]
    dtw_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = [python_dp(s.tokens, p.tokens, sm, pm) for s, p in zip(s_all, p_all, strict=True)]
    py_seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "method": "dtw_vs_python_dp_long",
                "source": source,
                "pivot": pivot,
                "sequences": len(joined),
                "pivot_tokens": pivot_tokens,
                "extrapolated": False,
                "dtw_seconds": round(dtw_seconds, 4),
                "python_dp_seconds": round(py_seconds, 3),
                "dtw_pivot_tokens_per_s": round(pivot_tokens / dtw_seconds),
                "python_dp_pivot_tokens_per_s": round(pivot_tokens / py_seconds),
                "same_alignment_as_dtw": all(a.to_lists() == b for a, b in zip(fast, slow, strict=True)),
                "dtw_speedup": round(py_seconds / dtw_seconds, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
