"""The CUDA code paths that CPU CI never runs, each checked against its CPU result.

    python -m pytest -m gpu tests/gpu                                  # on a machine with a GPU
    FUSEMERGE_GPU_TEST_DEVICE=cpu python -m pytest -m gpu tests/gpu    # dry run: the same checks, cpu vs cpu

- `run_merge(device="cuda")` (linear, ties, slerp, variation_ratio; float32 and bfloat16 models) against
  `device="cpu"`, which takes another route (numba kernels reading bf16 in place): float32 agrees to a few
  ulps, bfloat16 within one bf16 step.
- The fuse pipeline with the teacher on the GPU: its float32 top-K stores against CPU float32 ones, a
  bfloat16 teacher against the float32 one, then bf16 mixed-precision training (`full` and `lora`) on
  the GPU, the saved targets loaded back, and the VaRM merge of the targets on the GPU against the CPU.
- `evaluate_models(device="cuda")` against the CPU numbers.
- `accelerate launch` (examples/accelerate/fsdp.yaml, one process) running `fusemerge fuse` end to end
  (the teacher on the launched process's device, bf16 training under the FSDP plugin).

Without a GPU every test is skipped, unless FUSEMERGE_GPU_TEST_DEVICE names another device (cpu) to run
them there. With FUSEMERGE_GPU_REPORT=FILE, each test appends its measurements (agreement, differences,
losses) to FILE as JSON lines.

Only what a bare GPU machine has is imported (no mergekit, datasets, gguf or bitsandbytes).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fusemerge.offline.assets import build_random_model, perturb_model
from fusemerge.offline.corpora import chatterbot_conversations

DEVICE = os.environ.get("FUSEMERGE_GPU_TEST_DEVICE", "cuda")
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="no CUDA device (FUSEMERGE_GPU_TEST_DEVICE=cpu runs these checks on the CPU)",
    ),
]


def record(check: str, **values) -> None:
    """Print one JSON line of measurements and append it to $FUSEMERGE_GPU_REPORT when set."""
    line = json.dumps({"check": check, "device": DEVICE, **values}, default=float)
    print(line)
    path = os.environ.get("FUSEMERGE_GPU_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def quiet(_: str) -> None:
    pass


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_model(device_out: Path, cpu_out: Path, *, dtype: str, what: str) -> None:
    """float32: within rtol 1e-5 (+ atol 1e-7); bfloat16: every element within one bf16 step of the CPU's,
    plus a float32 accumulation floor of 2**-20 of the tensor's largest magnitude.

    Both devices compute in float32 and round to bf16 once, but CUDA contracts `acc + c * x` into one
    fused multiply-add where the CPU kernel rounds the product first. Where the weighted terms cancel
    (an output near zero) that float32 difference, tiny next to the inputs, is many bf16 steps of the
    near-zero output (first H200 run: 30 of 9.5M elements of a linear merge beyond one step).
    The measurements are recorded before any assertion, so a failure still reports them."""
    got, want = load_folder(device_out), load_folder(cpu_out)
    assert got.keys() == want.keys(), what
    max_abs, differing, total, outside = 0.0, 0, 0, {}
    for name, ref in want.items():
        out = got[name]
        assert out.dtype == ref.dtype and out.shape == ref.shape, f"{what}: {name}"
        a, b = out.float(), ref.float()
        assert torch.isfinite(a).all(), f"{what}: {name} is not finite"
        diff = (a - b).abs()
        max_abs = max(max_abs, float(diff.max()))
        differing += int((a != b).sum())
        total += a.numel()
        if dtype == "bfloat16":  # one bf16 step of x is 2**(exponent(x) - 7) <= 2**-7 * |x|
            bound = torch.maximum(a.abs(), b.abs()) * 2.0**-7 + float(b.abs().max()) * 2.0**-20
        else:
            bound = 1e-7 + 1e-5 * b.abs()
        bad = int((diff > bound).sum())
        if bad:
            worst = torch.argsort(diff.flatten() - bound.flatten(), descending=True)[:3]
            outside[name] = {
                "count": bad,
                "worst (device, cpu)": [(float(a.flatten()[i]), float(b.flatten()[i])) for i in worst],
            }
    record(
        what,
        max_abs_diff=max_abs,
        differing_fraction=differing / max(total, 1),
        elements=total,
        outside_tolerance=outside,
    )
    assert not outside, f"{what}: elements outside the {dtype} tolerance, per tensor: {outside}"


# ---------------------------------------------------------------- merge

MERGE_RECIPES = {
    "linear": """merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.2}}
dtype: {dtype}
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.7}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.3}}
dtype: {dtype}
""",
    "slerp": """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
parameters:
  t: [0, 0.3, 0.7, 1]
dtype: {dtype}
""",
    "variation_ratio": """merge_method: variation_ratio
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters: {{granularity: layer}}
dtype: {dtype}
""",
}
# (std, fraction of elements) of each 'fine-tune', as tests/merge/conftest.py: weights have std 0.02
DELTAS = {
    "float32": [(0.02, 1.0), (0.05, 0.5), (0.01, 0.3)],
    "bfloat16": [(0.002, 1.0), (0.005, 0.5), (0.001, 0.3)],
}


@pytest.fixture(scope="session")
def merge_families(tmp_path_factory):
    """A base and three perturbed 'fine-tunes' per dtype, built on first use. The embeddings (36000 x 128)
    are larger than one chunk of the methods (2**22 elements), so chunk boundaries are crossed."""
    families: dict[str, dict[str, Path]] = {}

    def family(dtype: str) -> dict[str, Path]:
        if dtype not in families:
            root = tmp_path_factory.mktemp(f"merge-{dtype}")
            base = build_random_model(
                root / "base",
                vocab_size=36000,
                hidden_size=128,
                intermediate_size=256,
                dtype=dtype,
                seed=0,
            )
            models = {"base": base}
            for i, (scale, fraction) in enumerate(DELTAS[dtype], start=1):
                models[f"ft{i}"] = perturb_model(
                    base, root / f"ft{i}", scale=scale, seed=i, fraction=fraction
                )
            families[dtype] = models
        return families[dtype]

    return family


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", list(MERGE_RECIPES))
def test_merge_on_device_equals_cpu(method, dtype, merge_families, tmp_path):
    from fusemerge.merge.api import run_merge

    family = merge_families(dtype)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(MERGE_RECIPES[method].format(dtype=dtype, **{k: str(v) for k, v in family.items()}))
    cpu = run_merge(recipe, tmp_path / "cpu", device="cpu", progress=False, echo=quiet)
    dev = run_merge(recipe, tmp_path / "device", device=DEVICE, progress=False, echo=quiet)
    assert_same_model(dev, cpu, dtype=dtype, what=f"merge {method} {dtype}")


# ---------------------------------------------------------------- fuse

TRAINING = {
    "learning_rate": 1e-3,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "batch_size": 4,
    "gradient_accumulation": 1,
    "max_steps": 8,
    "logging_steps": 1,
    "save_steps": 8,
    "keep_checkpoints": True,  # training_losses reads the last checkpoint's log
    "dtype": "bfloat16",
}


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    """24 real chatterbot conversations spread over its topics, with their topic as `domain`."""
    convs = chatterbot_conversations()
    step = max(1, len(convs) // 24)
    records = [{"domain": c["domain"], "messages": c["messages"]} for c in convs[::step][:24]]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def fuse_recipe(root: Path, models, data: Path, *, teacher: dict, training: dict, fusion=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    sections = {
        "pivot": str(models["qwen"]),
        "sources": [str(models["mistral"]), str(models["gpt2"])],
        "dataset": {"path": str(data), "max_length": 256},
        "teacher": {"top_k": 8, "batch_size": 8, "shard_size": 8, **teacher},
        "alignment": {"tokens": "dtw", "vocab": "stats"},
        "fusion": {"function": "mince", "lambda": 0.9, **(fusion or {})},
        "training": training,
        "output": str(root / "fused"),
    }
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False), encoding="utf-8")
    return path


def run_recipe(recipe: Path, steps=("teach", "align", "train")) -> dict:
    from fusemerge.fuse.pipeline import run_fuse

    lines: list[str] = []
    folders = run_fuse(recipe, steps=steps, progress=False, echo=lines.append)
    return {"recipe": recipe, "folders": folders, "lines": lines, "work": recipe.parent / "fused" / "work"}


@pytest.fixture(scope="session")
def cpu_teacher(tmp_path_factory, tiny_models, chat_jsonl):
    """The reference: the teach step on the CPU in float32."""
    root = tmp_path_factory.mktemp("fuse-cpu")
    recipe = fuse_recipe(
        root, tiny_models, chat_jsonl, teacher={"device": "cpu", "dtype": "float32"}, training=TRAINING
    )
    return run_recipe(recipe, steps=("teach",))


@pytest.fixture(scope="session")
def device_fp32_run(tmp_path_factory, tiny_models, chat_jsonl):
    """teach (float32 on the device) -> align -> full training in bf16 mixed precision, pairwise."""
    root = tmp_path_factory.mktemp("fuse-fp32")
    recipe = fuse_recipe(
        root,
        tiny_models,
        chat_jsonl,
        teacher={"device": DEVICE, "dtype": "float32"},
        training={**TRAINING, "mode": "full"},
    )
    return run_recipe(recipe)


@pytest.fixture(scope="session")
def device_bf16_run(tmp_path_factory, tiny_models, chat_jsonl):
    """teach (bfloat16 on the device) -> align -> LoRA training in bf16, one target from both sources."""
    root = tmp_path_factory.mktemp("fuse-bf16")
    recipe = fuse_recipe(
        root,
        tiny_models,
        chat_jsonl,
        teacher={"device": DEVICE, "dtype": "bfloat16"},
        training={**TRAINING, "mode": "lora", "learning_rate": 5e-3},
        fusion={"sources": "all"},
    )
    return run_recipe(recipe)


def teacher_stores(run: dict) -> dict[str, Path]:
    return {p.name: p for p in sorted((run["work"] / "teacher").iterdir())}


def test_teacher_float32_on_device_matches_cpu(cpu_teacher, device_fp32_run):
    from fusemerge.fuse.store import TopKStore

    ref_stores, dev_stores = teacher_stores(cpu_teacher), teacher_stores(device_fp32_run)
    assert ref_stores.keys() == dev_stores.keys() and len(ref_stores) == 3
    for name in ref_stores:
        ref, dev = TopKStore.open(ref_stores[name]), TopKStore.open(dev_stores[name])
        assert dev.identity["dtype"] == "float32" and len(ref) == len(dev) > 0
        same_ids = total = 0
        worst_lp = 0.0
        for i in range(len(ref)):
            a, b = ref.sequence(i), dev.sequence(i)
            assert a.ids.shape == b.ids.shape, f"{name}: sequence {i}"
            same_ids += int((a.ids == b.ids).sum())
            total += a.ids.size
            lp_a, lp_b = a.logprobs.astype(np.float32), b.logprobs.astype(np.float32)
            assert np.isfinite(lp_b).all(), f"{name}: sequence {i}"
            # the K values in order, whatever ids a near-tie swapped: the same to float16 rounding
            worst_lp = max(worst_lp, float(np.abs(lp_a - lp_b).max()))
        ce_a, ce_b = ref.metric_ce(), dev.metric_ce()
        assert np.array_equal(np.isnan(ce_a), np.isnan(ce_b)), name
        ce_diff = float(np.nanmax(np.abs(ce_a - ce_b) / np.maximum(np.abs(ce_a), 1e-6)))
        agreement = same_ids / total
        record(
            f"teacher float32 {name}",
            id_agreement=agreement,
            max_logprob_diff=worst_lp,
            max_metric_ce_rel_diff=ce_diff,
        )
        assert agreement >= 0.98, f"{name}: only {agreement:.4f} of top-K ids agree with the CPU's"
        assert worst_lp <= 2e-2, f"{name}: top-K log-probs differ by up to {worst_lp}"
        assert ce_diff <= 1e-4, f"{name}: metric_ce differs by up to {ce_diff} (relative)"


def test_teacher_bfloat16_on_device_is_close_to_float32(device_fp32_run, device_bf16_run):
    from fusemerge.fuse.store import TopKStore

    fp32, bf16 = teacher_stores(device_fp32_run), teacher_stores(device_bf16_run)
    for name in fp32:
        a, b = TopKStore.open(fp32[name]), TopKStore.open(bf16[name])
        assert b.identity["dtype"] == "bfloat16"
        overlap = top1 = rows = 0
        for i in range(len(a)):
            x, y = a.sequence(i), b.sequence(i)
            assert x.ids.shape == y.ids.shape
            assert np.isfinite(y.logprobs.astype(np.float32)).all()
            top1 += int((x.ids[:, 0] == y.ids[:, 0]).sum())
            overlap += sum(len(set(p) & set(q)) for p, q in zip(x.ids.tolist(), y.ids.tolist(), strict=True))
            rows += len(x.ids)
        k = a.identity["top_k"]
        ce_diff = np.nanmax(np.abs(a.metric_ce() - b.metric_ce()))
        record(
            f"teacher bfloat16 vs float32 {name}",
            top1_agreement=top1 / rows,
            topk_overlap=overlap / (rows * k),
            max_metric_ce_diff=float(ce_diff),
        )
        assert overlap / (rows * k) >= 0.6, name
        assert ce_diff < 0.05, name


def training_losses(run: dict, target: str) -> list[float]:
    steps = TRAINING["max_steps"]
    (state,) = (run["work"] / "train").glob(f"{target}-*/checkpoint-{steps}/trainer_state.json")
    history = json.loads(state.read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def check_target(run: dict, name: str, pivot: Path, *, mode: str) -> list[float]:
    """The target was trained where expected, saved as a loadable model that gives finite logits, and its
    loss was finite throughout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = run["folders"][f"target/{name}"]
    where = "cuda" if torch.cuda.is_available() else "cpu"
    losses = training_losses(run, name)
    trained, original = load_folder(target), load_folder(pivot)
    changed = [n for n in original if not torch.equal(trained[n], original[n])]
    record(f"train {mode} {name}", losses=losses, changed_tensors=len(changed), tensors=len(original))
    assert any(line.startswith(f"train {name}: {mode} on {where}") for line in run["lines"]), run["lines"]
    assert len(losses) == TRAINING["max_steps"] and all(math.isfinite(x) for x in losses), losses
    assert trained.keys() == original.keys()
    assert changed, f"{name}: no weight changed"
    model = AutoModelForCausalLM.from_pretrained(target).to(DEVICE).eval()
    tok = AutoTokenizer.from_pretrained(target)
    batch = tok(["Hello, how are you?", "What is your favourite book?"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**{k: v.to(DEVICE) for k, v in batch.items()}).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    return losses


def test_full_training_in_bf16_on_device(device_fp32_run, tiny_models):
    names = ["qwen-pivot-mistral-source", "qwen-pivot-gpt2-source"]
    for name in names:
        losses = check_target(device_fp32_run, name, tiny_models["qwen"], mode="full")
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"{name}: loss did not go down: {losses}"


def test_lora_training_in_bf16_on_device(device_bf16_run, tiny_models):
    losses = check_target(device_bf16_run, "qwen-pivot-fused", tiny_models["qwen"], mode="lora")
    assert min(losses[-3:]) < losses[0], f"loss did not go down: {losses}"


def test_varm_merge_of_the_fused_targets_on_device(device_fp32_run, tmp_path):
    from fusemerge.merge.api import run_merge

    recipe = device_fp32_run["folders"]["merge_recipe"]
    cpu = run_merge(recipe, tmp_path / "cpu", device="cpu", progress=False, echo=quiet)
    dev = run_merge(recipe, tmp_path / "device", device=DEVICE, progress=False, echo=quiet)
    assert_same_model(dev, cpu, dtype="float32", what="merge variation_ratio of fused targets")


# ---------------------------------------------------------------- eval


def test_evaluate_on_device_equals_cpu(tiny_models, chat_jsonl):
    from fusemerge.evaluate import evaluate_models

    models = [tiny_models["qwen"], tiny_models["mistral"], tiny_models["gpt2"]]

    def run(device: str, dtype: str):
        return evaluate_models(models, [chat_jsonl], device=device, dtype=dtype, progress=False)

    cpu, fp32, bf16 = run("cpu", "float32"), run(DEVICE, "float32"), run(DEVICE, "bfloat16")
    assert cpu.scores.keys() == fp32.scores.keys() == bf16.scores.keys()
    assert len(cpu.domains) > 1
    rel32, rel16 = {}, {}
    for key, ref in cpu.scores.items():
        for other in (fp32.scores[key], bf16.scores[key]):
            assert (other.sequences, other.tokens, other.bytes) == (ref.sequences, ref.tokens, ref.bytes), key
        assert ref.tokens > 0 and math.isfinite(ref.bits_per_byte), key
        rel32[key] = abs(fp32.scores[key].nll_nats - ref.nll_nats) / ref.nll_nats
        rel16[key] = abs(bf16.scores[key].bits_per_byte - ref.bits_per_byte) / ref.bits_per_byte
    record("eval", max_rel_diff_float32=max(rel32.values()), max_rel_diff_bfloat16=max(rel16.values()))
    assert max(rel32.values()) < 1e-4, {k: v for k, v in rel32.items() if v >= 1e-4}
    assert max(rel16.values()) < 2e-2, {k: v for k, v in rel16.items() if v >= 2e-2}


# ---------------------------------------------------------------- accelerate launch


def test_accelerate_launch_fsdp_runs_fuse(tmp_path, tiny_models, chat_jsonl):
    """`accelerate launch` with the shipped FSDP config, one process: teach, align and full training of
    one target; the target is saved whole and loads."""
    if importlib.util.find_spec("accelerate.commands.launch") is None:
        pytest.skip("accelerate's launcher is not installed")
    from transformers import AutoModelForCausalLM

    recipe = fuse_recipe(
        tmp_path,
        tiny_models,
        chat_jsonl,
        teacher={"dtype": "float32"},  # device auto: the launched process's device
        training={**TRAINING, "mode": "full", "max_steps": 2, "save_steps": 2},
    )
    sections = yaml.safe_load(recipe.read_text())
    sections["sources"] = sections["sources"][1:]  # one source (GPT-2 tokenizer): one target
    recipe.write_text(yaml.safe_dump(sections, sort_keys=False))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "examples" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--main_process_port",
        port,
        "-m",
        "fusemerge.cli",
        "fuse",
        str(recipe),
        "-q",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = done.stdout[-4000:] + done.stderr[-4000:]
    lines = [line for line in output.splitlines() if line.strip() and "it/s]" not in line]
    record("accelerate launch fsdp", returncode=done.returncode, tail=lines[-12:])
    assert done.returncode == 0, output
    target = tmp_path / "fused" / "qwen-pivot-gpt2-source"
    assert (target / "fusemerge_target.json").is_file(), output
    assert "one target, nothing to merge" in done.stdout, output
    model = AutoModelForCausalLM.from_pretrained(target)
    assert all(torch.isfinite(p).all() for p in model.parameters())
