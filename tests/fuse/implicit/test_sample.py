"""The prompts and the `sample` step on tiny random models: shards, resumption, kill -9, stale manifests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from implicit_helpers import math_prompts, write_jsonl

from fusemerge.checkpoint.layout import read_state
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.prompts import prompt_id_of, read_prompts
from fusemerge.fuse.implicit.sample import SampleModel, run_sample, sample_counts, shard_name, stage_lines
from fusemerge.fuse.implicit.spec import SamplingSpec

REPO = Path(__file__).resolve().parents[3]
QUIET = {"progress": False, "echo": lambda _: None}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.jsonl"))}


# -- prompts ----------------------------------------------------------------------------------------------
def test_prompts_keep_the_turns_up_to_the_last_user_turn_and_drop_duplicates(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"messages": chat, "domain": "math", "answer": 4},
            {
                "conversations": [{"from": "human", "value": "Sort a list"}],
                "domain": "code",
                "tests": ["assert 1", "x=2"],
            },
            {"messages": chat[:4]},  # the same prompt as the first one once its reply is dropped
            {"messages": [{"role": "assistant", "content": "no user"}]},
            {"messages": [{"role": "user", "content": "Name it"}], "prompt_id": "mine"},
        ],
    )
    prompts = read_prompts(path=str(path))
    assert [p.record for p in prompts.prompts] == [1, 2, 5]
    first, code, named = prompts.prompts
    assert list(first.messages) == chat[:4] and first.domain == "math" and first.answer == "4"
    assert first.prompt_id == prompt_id_of(chat[:4])
    assert (
        list(code.messages) == [{"role": "user", "content": "Sort a list"}] and code.tests == "assert 1\nx=2"
    )
    assert named.prompt_id == "mine" and named.domain == "general"
    assert prompts.duplicates == 1
    assert len(prompts.skipped) == 1 and prompts.skipped[0].line == 4
    with pytest.raises(FusemergeError, match=r"p.jsonl:4"):
        read_prompts(path=str(path), on_bad_record="error")
    # the ids do not depend on the order of the file, the hash of the set does
    shuffled = write_jsonl(
        tmp_path / "q.jsonl", [json.loads(line) for line in reversed(path.read_text().splitlines())]
    )
    again = read_prompts(path=str(shuffled))
    assert {p.prompt_id for p in again.prompts} == {p.prompt_id for p in prompts.prompts}
    assert again.fingerprint() != prompts.fingerprint()


def test_sample_counts_follow_the_domain_and_greedy_takes_one(tmp_path):
    prompts = read_prompts(path=str(write_jsonl(tmp_path / "p.jsonl", math_prompts(3))))
    spec = SamplingSpec(samples=2, samples_per_domain={"math": 3})
    assert sample_counts(prompts.prompts, spec=spec) == [3, 3, 2]
    assert sample_counts(prompts.prompts, spec=spec.model_copy(update={"temperature": 0.0})) == [1, 1, 1]


# -- sample ----------------------------------------------------------------------------------------------
SPEC = SamplingSpec(samples=2, samples_per_domain={"math": 3}, max_new_tokens=6, batch_size=2, shard_size=2)


def test_sample_writes_every_response_with_its_own_template_and_skips_when_done(
    chat_models, prompts_file, tmp_path
):
    prompts = read_prompts(path=str(prompts_file))
    expected = sum(sample_counts(prompts.prompts, spec=SPEC))
    for name, template in (("qwen", "pivot"), ("mistral", "chatml")):  # mistral's tokenizer has no template
        model = SampleModel(name=name, model=str(chat_models[name]), chat_template=template)
        folder = tmp_path / "samples" / name
        report = run_sample(model=model, prompts=prompts, spec=SPEC, folder=folder, **QUIET)
        assert report.shards_done == report.shards_total == 3 and report.samples == expected
        assert report.samples_per_s > 0
        lines = list(stage_lines(folder))
        assert len(lines) == expected
        by_prompt = {}
        for line in lines:
            assert line["model"] == name and line["finish_reason"] in ("stop", "length")
            assert isinstance(line["response"], str) and line["tokens"] <= SPEC.max_new_tokens
            by_prompt.setdefault(line["prompt_id"], []).append(line["sample_index"])
        assert [by_prompt[p.prompt_id] for p in prompts.prompts] == [
            list(range(n)) for n in sample_counts(prompts.prompts, spec=SPEC)
        ]
        state = read_state(folder)
        assert state["complete"] and state["identity"]["generation"]["chat_template"] == template
        before = folder_bytes(folder)
        again = run_sample(model=model, prompts=prompts, spec=SPEC, folder=folder, **QUIET)
        assert again.skipped and folder_bytes(folder) == before


def test_a_model_without_a_template_is_a_user_error(chat_models, prompts_file, tmp_path):
    prompts = read_prompts(path=str(prompts_file))
    model = SampleModel(name="mistral", model=str(chat_models["mistral"]))
    with pytest.raises(FusemergeError, match="no chat template"):
        run_sample(model=model, prompts=prompts, spec=SPEC, folder=tmp_path / "m", **QUIET)


def test_a_stale_manifest_is_refused_and_rebuild_starts_over(chat_models, prompts_file, tmp_path):
    prompts = read_prompts(path=str(prompts_file))
    model = SampleModel(name="qwen", model=str(chat_models["qwen"]))
    folder = tmp_path / "qwen"
    run_sample(model=model, prompts=prompts, spec=SPEC, folder=folder, **QUIET)
    hotter = SPEC.model_copy(update={"temperature": 1.3})
    with pytest.raises(FusemergeError, match="different generation"):
        run_sample(model=model, prompts=prompts, spec=hotter, folder=folder, **QUIET)
    fewer = read_prompts(path=str(prompts_file), limit=4)
    with pytest.raises(FusemergeError, match="n_prompts.*prompts_hash|prompts_hash"):
        run_sample(model=model, prompts=fewer, spec=SPEC, folder=folder, **QUIET)
    report = run_sample(model=model, prompts=prompts, spec=hotter, folder=folder, rebuild=True, **QUIET)
    assert report.shards_done == 3 and read_state(folder)["identity"]["generation"]["temperature"] == 1.3


RUNNER = """
import sys
from fusemerge.fuse.implicit.prompts import read_prompts
from fusemerge.fuse.implicit.sample import SampleModel, run_sample
from fusemerge.fuse.implicit.spec import SamplingSpec
model, prompts, folder = sys.argv[1:4]
spec = SamplingSpec.model_validate_json(sys.argv[4])
run_sample(model=SampleModel(name="qwen", model=model), prompts=read_prompts(path=prompts), spec=spec,
           folder=folder, progress=False)
"""


def test_kill_9_during_sample_then_rerun_gives_the_uninterrupted_files(chat_models, tmp_path):
    prompts_path = write_jsonl(tmp_path / "prompts.jsonl", math_prompts(8))
    prompts = read_prompts(path=str(prompts_path))
    spec = SamplingSpec(samples=2, max_new_tokens=8, batch_size=1, shard_size=1)
    model = SampleModel(name="qwen", model=str(chat_models["qwen"]))
    clean = tmp_path / "clean"
    run_sample(model=model, prompts=prompts, spec=spec, folder=clean, **QUIET)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", RUNNER, str(chat_models["qwen"]), str(prompts_path), str(killed)]
    proc = subprocess.Popen([*argv, spec.model_dump_json()], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / shard_name(1)).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("shard-*.jsonl")))
    assert done < 8, "finished before the kill: give it more shards"
    assert not read_state(killed)["complete"]

    report = run_sample(model=model, prompts=prompts, spec=spec, folder=killed, **QUIET)
    assert report.shards_done == 8 - done
    assert not list(killed.glob("*.tmp-*"))
    assert folder_bytes(killed) == folder_bytes(clean)


def test_a_changed_template_file_is_a_different_sample_set(chat_models, prompts_file, tmp_path):
    from fusemerge.lm.templates import BUILTIN_TEMPLATES

    template = tmp_path / "chat.jinja"
    template.write_text(BUILTIN_TEMPLATES["chatml"], encoding="utf-8")
    prompts = read_prompts(path=str(prompts_file), limit=2)
    model = SampleModel(name="mistral", model=str(chat_models["mistral"]), chat_template=str(template))
    folder = tmp_path / "mistral"
    run_sample(model=model, prompts=prompts, spec=SPEC, folder=folder, **QUIET)
    template.write_text(
        BUILTIN_TEMPLATES["chatml"].replace("<|im_start|>", "<|im_start|> "), encoding="utf-8"
    )
    with pytest.raises(FusemergeError, match="chat_template_hash"):
        run_sample(model=model, prompts=prompts, spec=SPEC, folder=folder, **QUIET)


def test_the_models_own_generation_config_does_not_leak_into_sampling(chat_models, tmp_path):
    """A top-k of 1 and a repetition penalty in generation_config.json would change the samples unseen."""
    import shutil

    from fusemerge.fuse.implicit.generate import GENERATION_BACKENDS, GenerationSettings, LoadSettings

    opinionated = shutil.copytree(chat_models["qwen"], tmp_path / "opinionated")
    config = {"top_k": 1, "repetition_penalty": 5.0, "eos_token_id": 5}
    (opinionated / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=2)
    prompts = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "What is 3 + 4?"}]]
    texts = {}
    for name, folder in (("plain", chat_models["qwen"]), ("opinionated", opinionated)):
        backend = GENERATION_BACKENDS.get("transformers").fn(
            model=str(folder), settings=settings, load=LoadSettings(), progress=False
        )
        texts[name] = [[g.text for g in gens] for gens in backend.generate(prompts, [3, 3], seed=7)]
        if name == "opinionated":
            assert 5 in backend.describe()["eos_token_ids"]  # its end-of-turn ids are still honoured
    assert texts["plain"] == texts["opinionated"]
    assert len({t for gens in texts["plain"] for t in gens}) > 1  # sampled, not greedy


def test_a_source_retrained_in_place_with_the_same_shapes_is_a_different_sample_set(
    chat_models, prompts_file, tmp_path
):
    """A retrained source's old samples must not be reused: same config, same file sizes, other weights."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fusemerge.fuse.implicit.sample import sample_identity

    model = tmp_path / "source"
    shutil.copytree(chat_models["qwen"], model)
    prompts = read_prompts(path=str(prompts_file))
    before = sample_identity(model=SampleModel(name="q", model=str(model)), prompts=prompts, spec=SPEC)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with safe_open(weights, "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(weights)
    save_file(
        {k: torch.flip(v, dims=[0]).contiguous() for k, v in tensors.items()}, weights, metadata=metadata
    )
    assert weights.stat().st_size == size  # the same shapes and sizes: only the values differ
    after = sample_identity(model=SampleModel(name="q", model=str(model)), prompts=prompts, spec=SPEC)
    assert after["model_fingerprint"] != before["model_fingerprint"]


def test_the_same_model_in_another_folder_draws_the_same_samples(chat_models, prompts_file, tmp_path):
    """Before: the seed came from the model's path, so the demo in another --out sampled other answers."""
    import shutil

    prompts = read_prompts(path=str(prompts_file))
    made = []
    for where in ("here", "there"):
        model = shutil.copytree(chat_models["qwen"], tmp_path / where / "qwen")
        folder = tmp_path / where / "samples"
        run_sample(
            model=SampleModel(name="qwen", model=str(model)),
            prompts=prompts,
            spec=SPEC,
            folder=folder,
            **QUIET,
        )
        made.append(folder_bytes(folder))
    assert made[0] == made[1] and made[0]
