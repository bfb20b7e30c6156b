"""`sft` then `preference` end to end on a tiny pivot: plain target folders that load, assistant-only SFT in
the pivot's own template, a preference loss that goes down, LoRA with the adapters-off reference, skips and
refusals, and kill -9 during `preference` then a rerun that ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_recipe, preference_rows, sft_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from fusemerge.checkpoint.layout import TARGET_STAMP
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.datasets import SftRecord, read_preference_data, read_sft_data
from fusemerge.fuse.implicit.preference import run_preference
from fusemerge.fuse.implicit.sft import build_sft_trainer, run_sft, sft_dataset
from fusemerge.fuse.implicit.spec import DataFileSpec
from fusemerge.fuse.trainer import last_complete_checkpoint
from fusemerge.lm.templates import BUILTIN_TEMPLATES

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("train_helpers.py")


class LossLog(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    """The GPT-2-tokenizer pivot (chatml) after SFT on 8 conversations, then WRPO on 8 pairs."""
    root = tmp_path_factory.mktemp("implicit")
    pivot = str(tiny_models["gpt2"])
    sft_file = write_jsonl(root / "sft.jsonl", sft_rows(8))
    pref_file = write_jsonl(root / "preference.jsonl", preference_rows(8))
    recipe = make_recipe(pivot, steps=4, loss="wrpo", alpha=0.5)
    messages: list[str] = []
    sft = run_sft(
        recipe=recipe,
        records=read_sft_data(spec=DataFileSpec(path=str(sft_file))),
        out=root / "fused" / "sft",
        checkpoints=root / "work" / "sft",
        max_length=96,
        data_names=[str(sft_file)],
        progress=False,
        echo=messages.append,
    )
    log = LossLog()
    pref = run_preference(
        recipe=recipe,
        pairs=read_preference_data(spec=DataFileSpec(path=str(pref_file))),
        policy=sft,
        out=root / "fused" / "wrpo",
        checkpoints=root / "work" / "wrpo",
        data_names=[str(pref_file)],
        progress=False,
        echo=messages.append,
        callbacks=[log],
    )
    return {
        "root": root,
        "pivot": pivot,
        "recipe": recipe,
        "sft": sft,
        "pref": pref,
        "sft_file": sft_file,
        "pref_file": pref_file,
        "losses": log.losses,
        "messages": messages,
    }


def test_sft_target_is_a_plain_model_with_its_template_card_and_stamp(trained):
    sft, pivot = trained["sft"], Path(trained["pivot"])
    model = AutoModelForCausalLM.from_pretrained(sft)
    assert model.config.use_cache
    before, after = tensors(pivot), tensors(sft)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert AutoTokenizer.from_pretrained(sft).chat_template == BUILTIN_TEMPLATES["chatml"]
    stamp = json.loads((sft / TARGET_STAMP).read_text())
    assert stamp["stage"] == "sft" and stamp["pivot"] == trained["pivot"] and stamp["max_length"] == 96
    card = (sft / "README.md").read_text()
    assert (
        "implicit-fusion" in card and "- source: `org/source-a`" in card and str(trained["sft_file"]) in card
    )
    assert (sft / "fusemerge_recipe.yml").read_text() == trained["recipe"].raw_yaml
    assert not any(p.name.startswith("adapter") for p in sft.iterdir())


def test_sft_rerun_skips_the_finished_target(trained):
    messages: list[str] = []
    mtime = (trained["sft"] / "model.safetensors").stat().st_mtime_ns
    run_sft(
        recipe=trained["recipe"],
        records=read_sft_data(spec=DataFileSpec(path=str(trained["sft_file"]))),
        out=trained["sft"],
        checkpoints=trained["root"] / "work" / "sft",
        max_length=96,
        progress=False,
        echo=messages.append,
    )
    assert messages == [f"sft sft: target complete, skipped ({trained['sft']})"]
    assert (trained["sft"] / "model.safetensors").stat().st_mtime_ns == mtime


def test_sft_learns_only_the_assistant_turns_in_the_pivots_own_template(qwen_tokenizer):
    records = [SftRecord(1, sft_rows(1)[0]["messages"])]
    template = qwen_tokenizer.chat_template
    dataset, dropped, _ = sft_dataset(
        records=records, tokenizer=qwen_tokenizer, template=template, max_length=200
    )
    row = dataset[0]
    learned = qwen_tokenizer.decode(
        [t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m]
    )
    assert dropped == 0
    assert "0 plus 3 is 3." in learned and learned.rstrip().endswith("<|im_end|>")
    assert "What is" not in learned and "<|im_start|>" not in learned
    # cut before the answer: nothing to learn, the conversation is left out (never an all-masked row)
    with pytest.raises(FusemergeError, match="no SFT record has an assistant turn within 5 tokens"):
        sft_dataset(records=records, tokenizer=qwen_tokenizer, template=template, max_length=5)


def test_sft_trainer_labels_are_the_assistant_tokens(tiny_models, gpt2_tokenizer, tmp_path):
    """TRL builds the labels from our `assistant_masks` column: -100 exactly where the mask is 0."""
    recipe = make_recipe(str(tiny_models["gpt2"]))
    records = [SftRecord(i + 1, r["messages"]) for i, r in enumerate(sft_rows(3))]
    template = BUILTIN_TEMPLATES["chatml"]
    dataset, _, _ = sft_dataset(records=records, tokenizer=gpt2_tokenizer, template=template, max_length=36)
    trainer = build_sft_trainer(
        recipe=recipe,
        tokenizer=gpt2_tokenizer,
        dataset=dataset,
        checkpoints=tmp_path,
        max_length=36,
        progress=False,
    )
    for mine, theirs in zip(dataset, trainer.train_dataset, strict=True):
        assert theirs["input_ids"] == mine["input_ids"][:36]
        expected = [t if m else -100 for t, m in zip(mine["input_ids"], mine["assistant_masks"], strict=True)]
        assert theirs["labels"] == expected[:36] and any(x != -100 for x in theirs["labels"])


def test_preference_target_loads_and_its_loss_decreases(trained):
    losses, pref = trained["losses"], trained["pref"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(pref)
    assert model.config.use_cache
    sft_weights, pref_weights = tensors(trained["sft"]), tensors(pref)
    assert any(not torch.equal(sft_weights[k], pref_weights[k]) for k in sft_weights)
    stamp = json.loads((pref / TARGET_STAMP).read_text())
    assert stamp["stage"] == "preference" and stamp["preference"]["loss"] == "wrpo"
    assert stamp["policy"] == json.loads(
        (trained["sft"] / TARGET_STAMP).read_text()
    )  # the SFT target it started from
    card = (pref / "README.md").read_text()
    assert "SFT then preference optimisation (wrpo)" in card and "- wrpo" in card
    assert any("wrpo (beta 0.5) on cpu, 8 pairs" in m for m in trained["messages"])


def test_lora_dpo_trains_adapters_against_the_adapters_off_reference(trained):
    recipe = make_recipe(trained["pivot"], mode="lora", steps=2, loss="dpo")
    log = LossLog()
    out = run_preference(
        recipe=recipe,
        pairs=read_preference_data(spec=DataFileSpec(path=str(trained["pref_file"]))),
        policy=trained["sft"],
        out=trained["root"] / "fused" / "lora-dpo",
        checkpoints=trained["root"] / "work" / "lora-dpo",
        progress=False,
        echo=lambda _: None,
        callbacks=[log],
    )
    # at step 1 the adapters are zero, so the policy is its reference: DPO's loss is exactly log 2
    assert log.losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert not any(p.name.startswith("adapter") for p in out.iterdir())  # folded into plain weights
    sft_weights, lora_weights = tensors(trained["sft"]), tensors(out)
    assert sft_weights.keys() == lora_weights.keys()
    assert any(not torch.equal(sft_weights[k], lora_weights[k]) for k in sft_weights)


def test_foreign_target_folder_and_foreign_checkpoints_are_refused(trained, tmp_path):
    pairs = read_preference_data(spec=DataFileSpec(path=str(trained["pref_file"])))
    recipe = make_recipe(trained["pivot"], loss="dpo", beta=0.1)
    with pytest.raises(FusemergeError, match="is not this preference target"):
        run_preference(
            recipe=recipe,
            pairs=pairs,
            policy=trained["sft"],
            out=trained["pref"],
            checkpoints=tmp_path / "ck",
            progress=False,
        )
    with pytest.raises(FusemergeError, match="checkpoints here were made for other settings"):
        run_preference(
            recipe=recipe,
            pairs=pairs,
            policy=trained["sft"],
            out=tmp_path / "new",
            checkpoints=trained["root"] / "work" / "wrpo",
            progress=False,
        )


def test_half_written_checkpoints_are_never_resumed_from(tmp_path):
    for step, complete in ((1, True), (2, True), (3, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "final").mkdir()
    assert last_complete_checkpoint(checkpoints=tmp_path) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-3").exists()
    assert last_complete_checkpoint(checkpoints=tmp_path / "none") is None


def worker(args: dict) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_kill_9_during_preference_then_rerun_matches_an_uninterrupted_run(trained, tmp_path):
    base = {"pivot": trained["pivot"], "policy": str(trained["sft"]), "pairs": str(trained["pref_file"])}
    base |= {"loss": "wrpo", "steps": 3}
    whole = worker(base | {"out": str(tmp_path / "whole"), "checkpoints": str(tmp_path / "ck-whole")})
    output, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, output

    checkpoints = tmp_path / "ck-killed"
    killed = worker(base | {"out": str(tmp_path / "resumed"), "checkpoints": str(checkpoints), "pause_s": 60})
    deadline = time.monotonic() + 600
    while not (checkpoints / "checkpoint-1" / "trainer_state.json").exists():
        assert killed.poll() is None, killed.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed").exists() and not (checkpoints / "checkpoint-2").exists()

    rerun = worker(base | {"out": str(tmp_path / "resumed"), "checkpoints": str(checkpoints)})
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    assert "resuming from checkpoint-1" in output
    expected, got = tensors(tmp_path / "whole"), tensors(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
