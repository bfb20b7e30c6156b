"""Model FLOPs utilisation of the teacher pass and of training (full and LoRA), one JSON line per stage.

    PYTHONPATH=. python bench/mfu_bench.py --size tiny                       # CPU, seconds
    PYTHONPATH=. python bench/mfu_bench.py --size 1b --device cuda           # a ~1.2B Llama, bf16
    PYTHONPATH=. python bench/mfu_bench.py --size 1b --device cuda --profile # + the top ops per stage
    PYTHONPATH=. python bench/mfu_bench.py --padding-demo                    # padding on the demo's data

The model is a Llama built from a config with random weights (nothing downloaded): `1b` has Llama-3.2-1B's
shape (16 layers, hidden 2048, 32 heads / 8 KV heads, MLP 8192, tied head) with the Qwen3 vocabulary
size (151,936), 1.23B weights; `small` (4 layers, hidden 512, 32k vocabulary) is big enough for matmuls to
dominate on a CPU; `tiny` is the same architecture small enough for a CPU test. Sequences
have chat-like lengths: log-normal around 300 tokens (many short, some long), clipped to [16, 2048],
fixed seed; half of each is the assistant's (labels, metric_ce).

Every stage runs fusemerge's own code: the teacher pass is `fusemerge.fuse.teacher._teach_shard` (its
length-sorted batches and `fusemerge.lm.forward.topk_forward`) on the model `load_teacher_model` loads;
training is `FusionTrainer` with `FusionCollator` (fused MinCE targets from top-10 stores written for these
sequences), the student from `load_student` and TrainingArguments from `training_arguments`, as
`fusemerge fuse` builds them. FLOPs come from `fusemerge.fuse.flops` (the formulas, counted on real tokens
only, are in its docstring); the first `--warmup` batches or steps are not timed. MFU is achieved TFLOP/s
over the device's dense bf16 peak (`fusemerge.fuse.flops.PEAK_BF16_TFLOPS`), `null` on a CPU (no peak).
Peak memory: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the process's peak RSS (everything
since start, so an upper bound).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=151_936,
    ),
    "small": dict(  # matmul-bound on a CPU: what CPU_TFLOPS in fusemerge.fuse.flops was measured with
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32_000,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
}


def chat_lengths(count: int, max_length: int, seed: int = 0) -> list[int]:
    """Chat-like lengths: log-normal (median 300, sigma 1), clipped to [16, max_length]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(300), 1.0, count), 16, max_length).astype(int).tolist()


def build_model(folder: Path, size: str, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device if device.startswith("cuda") else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if device.startswith("cuda") else torch.float32).save_pretrained(folder)
    del model
    return config


def sequences(count: int, max_length: int, vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, assistant mask) per sequence, as `ChatTokenizer` gives them to the teacher pass."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for length in chat_lengths(count, max_length, seed):
        ids = rng.integers(0, vocab, length).astype(np.int64)
        mask = np.zeros(length, dtype=bool)
        mask[length // 2 :] = True
        out.append((ids, mask))
    return out


class _Bar:
    def update(self, *_: Any) -> None:
        pass


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> dict[str, Any]:
    import torch

    if device.startswith("cuda"):
        return {
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20),
            "memory": "cuda allocated",
        }
    return {
        "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "memory": "process peak RSS since start",
    }


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def _profile(device: str):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    return profile(activities=activities)


def _top_ops(prof: Any, device: str, count: int = 8) -> list[dict[str, Any]]:
    """The ops that took the most self time (device time on a GPU), with their share of the total."""
    events = list(prof.key_averages())
    key = "self_cpu_time_total"
    if device.startswith("cuda"):  # torch renamed self_cuda_time_total to self_device_time_total
        key = (
            "self_device_time_total"
            if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
    total = sum(getattr(e, key, 0) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:count]
    return [
        {"op": e.key, "ms": round(getattr(e, key, 0) / 1e3, 2), "share": round(getattr(e, key, 0) / total, 3)}
        for e in top
    ]


def _line(stage: str, flops: float, seconds: float, tokens: int, device: str, extra: dict) -> dict[str, Any]:
    from fusemerge.fuse.flops import peak_tflops

    name = device_name(device)
    peak = peak_tflops(name) if device.startswith("cuda") else None
    achieved = flops / seconds / 1e12
    return {
        "bench": "mfu",
        "stage": stage,
        "device": name,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "tflops": round(achieved, 4),
        "peak_tflops": peak,
        "mfu": None if peak is None else round(achieved / peak, 4),
        **extra,
    }


def teacher_stage(folder: Path, data: list, args: argparse.Namespace, shape: Any) -> dict[str, Any]:
    import fusemerge.fuse.teacher as teacher
    from fusemerge.fuse.flops import padding_fraction, step_flops

    settings = teacher.TeacherSettings(
        top_k=10, batch_size=args.teacher_batch, dtype=args.dtype, device=args.device
    )
    lm = teacher.load_teacher_model(str(folder), settings, args.device, progress=False)
    batches: list[list[int]] = []
    real_forward = teacher.topk_forward

    def recorded(lm: Any, input_ids: Any, attention_mask: Any, **kw: Any) -> Any:
        batches.append(attention_mask.sum(1).tolist())  # the real batches of the teacher pass
        return real_forward(lm, input_ids, attention_mask, **kw)

    teacher.topk_forward = recorded
    try:
        teacher._teach_shard(lm, data[: args.warmup * args.teacher_batch], settings, 0, args.device, _Bar())
        batches.clear()
        _reset_memory(args.device)
        _sync(args.device)
        start = time.perf_counter()
        if args.profile:
            with _profile(args.device) as prof:
                teacher._teach_shard(lm, data, settings, 0, args.device, _Bar())
                _sync(args.device)
        else:
            teacher._teach_shard(lm, data, settings, 0, args.device, _Bar())
        _sync(args.device)
        seconds = time.perf_counter() - start
    finally:
        teacher.topk_forward = real_forward
    lengths = [n for b in batches for n in b]
    flops = step_flops(shape, lengths, "teacher")
    extra = {
        "batch_size": args.teacher_batch,
        "dtype": teacher.resolve_dtype(args.dtype, args.device),
        "padding_fraction": round(padding_fraction(batches), 4),
        **_peak_memory(args.device),
    }
    if args.profile:
        extra["profile_top"] = _top_ops(prof, args.device)
    del lm
    return _line("teacher", flops, seconds, sum(lengths), args.device, extra)


def _stores(root: Path, data: list, vocab: int) -> tuple[Any, Any]:
    """A pivot and an aligned top-10 store for these sequences (random rows, the gold token first)."""
    from fusemerge.fuse.store import TopKStore

    rng = np.random.default_rng(2)
    out = []
    for name, aligned in (("pivot", False), ("aligned", True)):
        identity = {"kind": "aligned" if aligned else "teacher", "top_k": 10, "vocab": "pivot", "bench": name}
        store = TopKStore.create_or_resume(root / name, identity, n_sequences=len(data), shard_size=256)
        for shard in range(store.n_shards):
            ids_list, lps_list, ces = [], [], []
            for i in store.shard_sequences(shard):
                ids = data[i][0]
                top = rng.integers(0, vocab, (len(ids), 10)).astype(np.int32)
                top[:-1, 0] = ids[1:]
                lps = np.sort(np.log(rng.dirichlet(np.ones(10), len(ids))), axis=1)[:, ::-1]
                ids_list.append(top)
                lps_list.append(lps.astype(np.float16))
                ces.append(float(rng.uniform(1, 3)))
            store.write_shard(
                shard, ids_list, lps_list, ces, ce_per_byte=[c / 3 for c in ces]
            )  # ~3 bytes/token
        store.finalize()
        out.append(TopKStore.open(root / name))
    return out[0], out[1]


def train_stage(
    mode: str, folder: Path, data: list, args: argparse.Namespace, shape: Any, root: Path
) -> dict:
    import torch
    from transformers import TrainerCallback

    from fusemerge.fuse.collate import FusionCollator, next_token_labels
    from fusemerge.fuse.flops import padding_fraction, step_flops
    from fusemerge.fuse.hf_compat import precision, training_arguments
    from fusemerge.fuse.recipe import DatasetSpec, FuseRecipe, ModelSpec, TrainingSpec
    from fusemerge.fuse.train import load_student
    from fusemerge.fuse.trainer import FusionTrainer

    cuda = args.device.startswith("cuda")
    steps = args.warmup + args.steps
    recipe = FuseRecipe(
        pivot=ModelSpec(model=str(folder)),
        sources=[ModelSpec(model="bench-source")],
        dataset=DatasetSpec(path="unused"),
        training=TrainingSpec(
            mode=mode,
            batch_size=args.train_batch,
            gradient_accumulation=1,
            max_steps=steps,
            learning_rate=1e-5,
            warmup_ratio=0.0,
            save_steps=10**9,
            logging_steps=10**9,
            gradient_checkpointing=args.checkpointing,
        ),
        output=str(root / "out"),
    )
    pivot_store, aligned = _stores(root / "stores", data, shape.vocab)
    dataset = [
        {"index": i, "input_ids": ids, "labels": next_token_labels(ids, mask)}
        for i, (ids, mask) in enumerate(data)
    ]
    collator = FusionCollator(pivot_store, {"source": aligned}, function="mince", pad_id=0)
    times: list[float] = []
    seen: list[Any] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> Any:
            _sync(args.device)
            times.append(time.perf_counter())
            if state.global_step == args.warmup:
                _reset_memory(args.device)
            control.should_save = False  # no checkpoint inside or at the end of the timing
            return control

    class Measured(FusionTrainer):
        def compute_loss(self, model: Any, inputs: dict, *a: Any, **kw: Any) -> Any:
            seen.append(inputs["attention_mask"].sum(1))  # real lengths of this micro-batch, no sync
            return super().compute_loss(model, inputs, *a, **kw)

    _reset_memory(args.device)
    trainer = Measured(
        model=load_student(recipe, cuda=cuda),
        args=training_arguments(recipe, root / f"ckpt-{mode}", cuda=cuda, progress=False),
        data_collator=collator,
        train_dataset=dataset,
        lambda_=0.9,
        echo=lambda _: None,
    )
    trainer.add_callback(Clock())
    if args.profile:
        with _profile(args.device) as prof:
            trainer.train()
    else:
        trainer.train()
    batches = [t.tolist() for t in seen]
    timed = batches[args.warmup :]
    seconds = times[-1] - times[args.warmup - 1] if args.warmup else times[-1] - times[0]
    lengths = [n for b in timed for n in b]
    flops = step_flops(shape, lengths, mode, lora_r=recipe.training.lora_r, checkpointing=args.checkpointing)
    mixed = precision(recipe.training.dtype, cuda)
    extra = {
        "mode": mode,
        "batch_size": args.train_batch,
        "steps_timed": len(timed),
        "precision": "bf16 autocast" if mixed["bf16"] else "float32",
        "gradient_checkpointing": args.checkpointing,
        "padding_fraction": round(padding_fraction(timed), 4),
        **_peak_memory(args.device),
    }
    if args.profile:
        extra["profile_top"] = _top_ops(prof, args.device)
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return _line(mode, flops, seconds, sum(lengths), args.device, extra)


def padding_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Padding of the teacher pass and of training batches on the fusion demo's own data and settings."""
    import fusemerge.fuse.teacher as teacher
    from fusemerge.demo.corpus import build_corpus
    from fusemerge.demo.fusion import DemoPlan
    from fusemerge.demo.pretrain import demo_tokenizer
    from fusemerge.fuse.collate import FusionCollator, FusionDataset
    from fusemerge.fuse.data import build_chat_data
    from fusemerge.fuse.flops import padding_fraction
    from fusemerge.fuse.hf_compat import training_arguments
    from fusemerge.fuse.recipe import DatasetSpec, FuseRecipe, ModelSpec, TrainingSpec
    from fusemerge.fuse.trainer import FusionTrainer
    from fusemerge.lm.tokens import ChatTokenizer

    plan = DemoPlan()
    teach = plan.fuse["teacher"]
    train_batch = plan.fuse["training"]["batch_size"]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp) / "demo")
        tok = demo_tokenizer(plan.pivot)
        data = build_chat_data(
            DatasetSpec(path=str(corpus.fusion_file), format="openai", max_length=512), tok
        )
        tokenized = [ChatTokenizer(tok)(s) for s in data.sequences]
        lengths = [len(ids) for ids, _ in tokenized]
        folder = Path(tmp) / "model"
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=1024,
            )
        ).save_pretrained(folder)
        tok.save_pretrained(folder)
        settings = teacher.TeacherSettings(
            batch_size=teach["batch_size"], shard_size=teach["shard_size"], device="cpu"
        )
        lm = teacher.load_teacher_model(str(folder), settings, "cpu", progress=False)
        batches: list[list[int]] = []
        real_forward = teacher.topk_forward

        def recorded(lm: Any, input_ids: Any, attention_mask: Any, **kw: Any) -> Any:
            batches.append(attention_mask.sum(1).tolist())
            return real_forward(lm, input_ids, attention_mask, **kw)

        teacher.topk_forward = recorded
        try:
            for first in range(0, len(tokenized), settings.shard_size):  # the store's shards, as run_teacher
                teacher._teach_shard(
                    lm, tokenized[first : first + settings.shard_size], settings, 0, "cpu", _Bar()
                )
        finally:
            teacher.topk_forward = real_forward
        size = settings.batch_size
        unsorted = [lengths[a : a + size] for a in range(0, len(lengths), size)]
        out.append(
            {
                "bench": "padding",
                "data": "fusion demo",
                "sequences": len(lengths),
                "tokens": sum(lengths),
                "step": "teacher",
                "batch_size": size,
                "padding_fraction": round(padding_fraction(batches), 4),
                "padding_fraction_in_data_order": round(padding_fraction(unsorted), 4),
            }
        )
        for grouped in (True, False):
            recipe = FuseRecipe(
                pivot=ModelSpec(model=str(folder)),
                sources=[],
                dataset=DatasetSpec(path="unused"),
                fusion={"function": "none"},
                output=str(Path(tmp) / "out"),
                training=TrainingSpec(batch_size=train_batch, group_by_length=grouped, epochs=1),
            )
            trainer = FusionTrainer(
                model=lm,
                args=training_arguments(recipe, Path(tmp) / "ckpt", cuda=False, progress=False),
                data_collator=FusionCollator(None, {}, with_targets=False),
                train_dataset=FusionDataset(data, tok),
                lambda_=1.0,
                echo=lambda _: None,
            )
            train_batches = [b["attention_mask"].sum(1).tolist() for b in trainer.get_train_dataloader()]
            out.append(
                {
                    "bench": "padding",
                    "data": "fusion demo",
                    "sequences": len(lengths),
                    "step": "train",
                    "batch_size": train_batch,
                    "group_by_length": grouped,
                    "padding_fraction": round(padding_fraction(train_batches), 4),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="auto", help="teacher dtype (auto: bf16 on a GPU, float32 on a CPU)"
    )
    parser.add_argument("--stages", default="teacher,full,lora")
    parser.add_argument("--sequences", type=int, default=256, help="teacher-pass sequences")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--teacher-batch", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument(
        "--steps",
        type=int,
        default=48,
        help="timed optimizer steps per training stage (48 + 2 warm-up: one mega-batch of the length-grouped "
        "sampler, whose batches run longest first)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches / steps first")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in training")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's top ops per stage")
    parser.add_argument("--padding-demo", action="store_true", help="only the padding of the demo's batches")
    args = parser.parse_args()
    if args.padding_demo:
        for line in padding_demo(args):
            print(json.dumps(line), flush=True)
        return

    from fusemerge.fuse.flops import ModelShape

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "model"
        config = build_model(folder, args.size, args.device)
        shape = ModelShape.from_config(config)
        common = {"model": f"llama-{args.size}", "matmul_weights": shape.matmul_weights}
        stages = args.stages.split(",")
        if "teacher" in stages:
            data = sequences(args.sequences + args.warmup * args.teacher_batch, args.max_length, shape.vocab)
            print(json.dumps({**teacher_stage(folder, data, args, shape), **common}), flush=True)
        # as many sequences as transformers' LengthGroupedSampler needs for its full mega-batches (50 batches):
        # the timed steps then see the padding a real run's length-grouped batches have
        need = max((args.warmup + args.steps) * args.train_batch, 200 * args.train_batch)
        train_data = sequences(need, args.max_length, shape.vocab, seed=5)
        for mode in ("full", "lora"):
            if mode in stages:
                print(
                    json.dumps({**train_stage(mode, folder, train_data, args, shape, root), **common}),
                    flush=True,
                )


if __name__ == "__main__":
    main()
