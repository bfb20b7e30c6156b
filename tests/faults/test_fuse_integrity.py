"""The fuse side under faults (issue 16): NaN/Inf in every input kind is refused before it spreads, changed
weights are noticed, a second run on a busy work dir is refused, orphans of killed runs are cleaned,
a full disk mid-checkpoint and kill -9 at every step resume to the uninterrupted run's target, and two
identical runs give identical targets (full and LoRA, the default).

One module fixture makes a tiny pivot (GPT-2 tokenizer) and a source (Mistral tokenizer) and one
recipe writer; every test runs in its own folders."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fusemerge.cli import main
from fusemerge.errors import FusemergeError
from fusemerge.fuse.pipeline import run_fuse
from tests.faults.conftest import assert_one_line_exit_2

ROOT = Path(__file__).parents[2]
TRAINING = {
    "learning_rate": 1e-3,
    "batch_size": 2,
    "gradient_accumulation": 1,
    "max_steps": 3,
    "save_steps": 1,
    "logging_steps": 1,
    "lora_r": 4,
}


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Private copies (tests overwrite weights in place): the pivot and one source."""
    root = tmp_path_factory.mktemp("fuse-integrity")
    return {
        "pivot": Path(shutil.copytree(tiny_models["gpt2"], root / "pivot")),
        "src": Path(shutil.copytree(tiny_models["mistral"], root / "src")),
    }


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory) -> Path:
    """8 real conversations (chatterbot corpus), one per line."""
    import json

    from fusemerge.offline.corpora import chatterbot_conversations

    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    conversations = chatterbot_conversations()[::25][:8]
    path.write_text("".join(json.dumps({"messages": c["messages"]}) + "\n" for c in conversations))
    return path


def write_recipe(
    folder: Path, models: dict[str, Path], chat: Path, *, fusion: dict | None = None, **training
) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "pivot": str(models["pivot"]),
        "sources": [str(models["src"])],
        "dataset": {"path": str(chat), "limit": 8},
        "chat_template": "chatml",
        "teacher": {"shard_size": 4, "device": "cpu"},
        "alignment": {"tokens": "offsets", "vocab": "exact"},
        "fusion": fusion or {"lambda": 0.5},
        "training": {**TRAINING, **training},
        "output": str(folder / "out"),
    }
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def target_of(folder: Path) -> Path:
    return folder / "out" / "pivot-src"


def fuse_cli(recipe: Path, *args: str):
    return CliRunner().invoke(main, ["fuse", str(recipe), "-q", *args])


def poison(model: Path, dst: Path, value: float, name: str = "model.layers.1.mlp.down_proj.weight") -> Path:
    hostile = Path(shutil.copytree(model, dst))
    tensors = load_file(hostile / "model.safetensors")
    tensors[name][3, 5] = value
    save_file(tensors, hostile / "model.safetensors", metadata={"format": "pt"})
    return hostile


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


# ---------------------------------------------------------------- NaN / Inf in each input kind


@pytest.mark.parametrize(("role", "value"), [("pivot", float("nan")), ("src", float("inf"))])
def test_a_nonfinite_weight_is_refused_before_any_store_is_written(role, value, models, chat_jsonl, tmp_path):
    hostile = poison(models[role], tmp_path / f"hostile-{role}", value)
    recipe = write_recipe(tmp_path / "run", {**models, role: hostile}, chat_jsonl)
    line = assert_one_line_exit_2(fuse_cli(recipe))
    assert str(hostile) in line and "model.layers.1.mlp.down_proj.weight" in line and "NaN or Inf" in line
    assert not list((tmp_path / "run" / "out" / "work").rglob("shard-*.safetensors"))
    assert not target_of(tmp_path / "run").exists()


def test_a_nonfinite_pivot_is_refused_for_a_fine_tune_too(models, chat_jsonl, tmp_path):
    """A fine-tune has no teacher pass: the student's own load is the check."""
    hostile = poison(models["pivot"], tmp_path / "hostile", float("nan"))
    recipe = write_recipe(
        tmp_path / "run", {**models, "pivot": hostile}, chat_jsonl, fusion={"function": "none"}
    )
    line = assert_one_line_exit_2(fuse_cli(recipe))
    assert "the pivot holds NaN or Inf weights" in line and str(hostile) in line


def test_a_teacher_pass_that_overflows_is_refused_naming_store_and_sequence(
    models, chat_jsonl, tmp_path, monkeypatch
):
    """Finite weights, NaN/+Inf out of the forward (float16 overflow): nothing of that shard is written."""
    import fusemerge.fuse.teacher as teacher_module

    real = teacher_module.topk_forward

    def overflowing(*args, **kwargs):
        values, ids, next_lp = real(*args, **kwargs)
        values[5, 0] = float("inf")
        return values, ids, next_lp

    monkeypatch.setattr(teacher_module, "topk_forward", overflowing)
    recipe = write_recipe(tmp_path / "run", models, chat_jsonl)
    with pytest.raises(FusemergeError) as err:
        run_fuse(recipe, steps=["teach"], progress=False, echo=lambda _: None)
    line = err.value.one_line()
    store = tmp_path / "run" / "out" / "work" / "teacher" / "pivot"
    assert line.startswith(f"{store}: the teacher pass gave +Inf log-probabilities for sequence ")
    assert not list(store.glob("shard-*"))


def test_a_nonfinite_store_value_stops_training_with_exit_2_and_no_target(models, chat_jsonl, tmp_path):
    """A store corrupted after it was written (+Inf in its log-probabilities) reaches the loss: the run
    stops at that step, names it, keeps what it had and publishes nothing."""
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    from fusemerge.fuse.store import STORE_FORMAT

    recipe = write_recipe(tmp_path / "run", models, chat_jsonl, mode="full")
    assert fuse_cli(recipe, "--steps", "teach,align").exit_code == 0
    for store in ("teacher/pivot", "aligned/src"):
        for shard in (tmp_path / "run" / "out" / "work" / store).glob("shard-*.safetensors"):
            tensors = load_np(str(shard))
            lps = tensors["logprobs"].copy()
            lps[np.isfinite(lps)] = np.inf
            save_np({**tensors, "logprobs": lps}, str(shard), metadata={"format": STORE_FORMAT})
    line = assert_one_line_exit_2(fuse_cli(recipe, "--steps", "train"))
    assert "training diverged at step 1/3: the loss is nan" in line and "no target saved" in line
    assert not target_of(tmp_path / "run").exists()


# ---------------------------------------------------------------- changed weights


def test_weights_overwritten_in_place_rebuild_the_store_and_the_target(models, chat_jsonl, tmp_path):
    mine = {"pivot": models["pivot"], "src": Path(shutil.copytree(models["src"], tmp_path / "src"))}
    recipe = write_recipe(tmp_path / "run", mine, chat_jsonl, mode="full", max_steps=1)
    assert fuse_cli(recipe).exit_code == 0
    before = load_file(target_of(tmp_path / "run") / "model.safetensors")
    weights = mine["src"] / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(9)
    save_file(
        {n: torch.randn(t.shape, generator=generator) for n, t in tensors.items()},
        weights,
        metadata={"format": "pt"},
    )
    assert weights.stat().st_size == size  # same names, shapes and size: only the content differs

    only_train = assert_one_line_exit_2(fuse_cli(recipe, "--steps", "train"))
    assert f"the weights of {mine['src']} changed since its teacher store was made" in only_train
    result = fuse_cli(recipe)
    assert result.exit_code == 0, result.output
    assert "teach src: the weights of" in result.output and "made again" in result.output
    assert "store complete, skipped" in result.output  # the pivot's store is still good
    assert "target was trained from other weights" in result.output
    after = load_file(target_of(tmp_path / "run") / "model.safetensors")
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert "skipped" in fuse_cli(recipe).output  # and now it is up to date


# ---------------------------------------------------------------- concurrent runs, orphans


def test_a_second_fuse_on_a_busy_work_dir_is_refused_and_orphans_of_dead_runs_are_cleaned(
    models, chat_jsonl, tmp_path
):
    recipe = write_recipe(tmp_path / "run", models, chat_jsonl, max_steps=1)
    work = tmp_path / "run" / "out" / "work"
    (work / ".fusemerge").mkdir(parents=True)
    with open(work / ".fusemerge" / "lock", "w") as held:  # a live fuse holds this lock
        held.write("12345")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        line = assert_one_line_exit_2(fuse_cli(recipe))
        assert "another fuse is writing this folder (pid 12345)" in line and str(work) in line

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run" / "out"
    orphans = [
        out / f"pivot-src.tmp-{dead.pid}",
        work / "teacher" / "pivot" / f"manifest.json.tmp-{dead.pid}",
    ]
    orphans[0].mkdir(parents=True)
    orphans[1].parent.mkdir(parents=True)
    orphans[1].write_text("half")
    live = out / f"other.tmp-{os.getppid()}"
    live.mkdir()
    result = fuse_cli(recipe)
    assert result.exit_code == 0, result.output
    assert "removed 2 temporary file(s) left by killed runs" in result.output
    assert not any(p.exists() for p in orphans) and live.is_dir()


def test_a_full_disk_mid_checkpoint_never_blocks_the_rerun(models, chat_jsonl, tmp_path, monkeypatch):
    """The optimizer state of checkpoint-2 cannot be written: the rerun skips that checkpoint with a line
    and ends with the uninterrupted run's target."""
    import transformers.trainer as trainer_module

    straight = write_recipe(tmp_path / "straight", models, chat_jsonl, mode="full")
    run_fuse(straight, progress=False, echo=lambda _: None)
    recipe = write_recipe(tmp_path / "run", models, chat_jsonl, mode="full")
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_fuse(recipe, progress=False, echo=lambda _: None)
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    lines: list[str] = []
    run_fuse(recipe, progress=False, echo=lines.append)
    assert any("checkpoint-2 is incomplete" in line for line in lines), lines
    assert any("resuming from checkpoint-1" in line for line in lines), lines
    assert same_weights(target_of(tmp_path / "run"), target_of(tmp_path / "straight"))


# ---------------------------------------------------------------- reproducible runs, kill -9 anywhere


def test_two_identical_default_runs_give_identical_targets(models, chat_jsonl, tmp_path):
    """`mode: lora` (the default): the adapters come from the training seed, not from the process's RNG."""
    targets = []
    for run in ("a", "b"):
        torch.manual_seed(len(run) + ord(run))  # whatever the process did before
        recipe = write_recipe(tmp_path / run, models, chat_jsonl, max_steps=2)
        run_fuse(recipe, progress=False, echo=lambda _: None)
        targets.append(target_of(tmp_path / run))
    assert same_weights(*targets)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _cmd(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "fusemerge.cli", "fuse", str(recipe), "-q"]


def _kill_when(recipe: Path, appears: str) -> None:
    """Start `fuse` and SIGKILL it as soon as a path matching the glob `appears` (under the run) exists."""
    run = recipe.parent
    proc = subprocess.Popen(_cmd(recipe), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not list(run.glob(appears)):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before {appears} appeared"


# where each kill lands: in the teacher pass, in the align step, right as the first checkpoint folder
# appears (mid-checkpoint), in training after it, and while the target is being saved
KILL_POINTS = [
    "out/work/teacher/pivot/shard-00000.safetensors",
    "out/work/aligned/src/*",
    "out/work/train/*/checkpoint-1",
    "out/work/train/*/checkpoint-2",
    "out/pivot-src.tmp-*",
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_kill_9_at_every_step_then_rerun_gives_the_uninterrupted_target(mode, models, chat_jsonl, tmp_path):
    straight = write_recipe(tmp_path / "straight", models, chat_jsonl, mode=mode)
    subprocess.run(_cmd(straight), env=_env(), check=True, capture_output=True)
    recipe = write_recipe(tmp_path / "run", models, chat_jsonl, mode=mode)
    for point in KILL_POINTS:  # each rerun picks up what the last kill left, and is killed further on
        _kill_when(recipe, point)
        assert not target_of(tmp_path / "run").exists()
    result = subprocess.run(_cmd(recipe), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert same_weights(target_of(tmp_path / "run"), target_of(tmp_path / "straight"))
    assert not list((tmp_path / "run" / "out").glob("*.tmp-*"))
