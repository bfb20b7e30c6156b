"""Elementwise merges streamed through the CPU cache: read a chunk of every input, merge it, write it.

Linear and task arithmetic compute each output element from the same element of the inputs alone. The
whole-tensor pipeline of `fusemerge.merge.engine` reads every input tensor into memory first, so each byte
goes page cache -> DRAM buffer -> kernel -> DRAM result -> page cache; on our 2-core machines that made
these merges about 3x their I/O floor (bench/io_floor.py) before start-up. Here a tensor is read a chunk
of `CHUNK_ELEMENTS` at a time into a few small reused buffers that stay in the CPU's cache, merged by the
same numba kernel the whole-tensor path calls (so the output is bit-equal: the kernels are elementwise,
and a chunk is a span of them), and the result chunk is written into its place in the shard at once, as
the floor's `readinto` + `write` do. A writer thread overlaps `pwrite` with the next chunk's reads and
arithmetic (both release the GIL in the system call).

Only tasks the kernels would merge exactly so take this path (`chunk_kernel`): one stored dtype (bf16 or
float32) in and out, computed in float32 on the CPU, read from plain safetensors bytes. Everything else
(other methods, dtype changes, LoRA folds, pickle checkpoints, a GPU) keeps the whole-tensor engine.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fusemerge.checkpoint.dtypes import ITEM_SIZE
from fusemerge.checkpoint.writer import ShardedWriter
from fusemerge.errors import FusemergeError

if TYPE_CHECKING:  # the plan asks this module for its estimate: no import back at run time
    from fusemerge.merge.plan import MergePlan, TensorTask

CHUNK_ELEMENTS = 1 << 19  # 1 MiB of bf16 per input: inputs + result stay in L2/L3 cache
_NUMPY = {"BF16": np.uint16, "F32": np.float32}  # bf16 goes to the kernels as its raw bits
Kernel = Callable[[tuple[np.ndarray, ...], np.ndarray | None, np.ndarray], None]


def chunk_kernel(plan: MergePlan, task: TensorTask, device: str) -> Kernel | None:
    """The chunk-wise kernel call equal to what the method computes for the whole tensor, or None where
    the task must take the whole-tensor path."""
    name = plan.method.name
    if device != "cpu" or task.copy_from is not None or name not in ("linear", "task_arithmetic"):
        return None
    infos = [*task.inputs, *([task.base] if task.base is not None else [])]
    dtype = task.out_dtype
    if dtype not in _NUMPY or task.work_dtype not in (None, dtype) or not infos:
        return None
    if any(i.dtype != dtype for i in infos) or not all(plan.folder_of(i).stored_bytes(i.name) for i in infos):
        return None
    from fusemerge.merge.kernels import cpu as kernels

    weight = list(task.per_model["weight"])
    total = sum(weight)
    if name == "linear":
        # `linear` -> kernels.chunks.weighted_sum -> kernels.weighted_tuple, with these arguments
        if task.shared["normalize"] and total == 0:
            return None  # the method's own error names the tensor
        coefs = np.array(weight, dtype=np.float32)
        divide = np.float32(total if task.shared["normalize"] else 1.0)
        return lambda xs, b, out: kernels.weighted_tuple(xs, coefs, divide, out)
    if task.base is None:
        return None
    # `task_arithmetic` -> combine -> kernels.combine.fused_combine's unmasked branch -> task_sum_tuple
    # (rescale's factor is 1 where nothing is dropped: the coefficients are the weights)
    coef = np.array([w * 1.0 for w in weight], dtype=np.float32)
    scale = np.float32(1.0 / (total if abs(total) >= 1e-8 else 1.0) if task.shared["normalize"] else 1.0)
    lam = np.float32(task.shared["lambda"])
    return lambda xs, b, out: kernels.task_sum_tuple(xs, b, coef, scale, lam, out)


def streamable(plan: MergePlan, tasks: list[TensorTask], device: str) -> bool:
    """Every task merges chunk-wise (the stream does not mix with the whole-tensor pipeline)."""
    return bool(tasks) and all(chunk_kernel(plan, t, device) is not None for t in tasks)


def stream_bytes(tasks: list[TensorTask]) -> int:
    """The data memory `execute_streamed` holds: one chunk buffer per input slot and two result chunks."""
    slots = max(len(t.inputs) + (t.base is not None) for t in tasks)
    item = max(ITEM_SIZE[t.out_dtype] for t in tasks)
    return (slots + 2) * CHUNK_ELEMENTS * item


def execute_streamed(
    plan: MergePlan,
    writer: ShardedWriter,
    tasks: list[TensorTask],
    *,
    device: str,
    allow_nonfinite: bool,
    on_bytes: Callable[[int], None],
) -> int:
    """Merge `tasks` chunk by chunk (see the module docstring); returns the number of tensors written."""
    slots = max(len(t.inputs) + (t.base is not None) for t in tasks)
    item = max(ITEM_SIZE[t.out_dtype] for t in tasks)  # stream_bytes counts these buffers
    inputs = [np.empty(CHUNK_ELEMENTS * item, dtype=np.uint8) for _ in range(slots)]
    spare: queue.Queue[np.ndarray] = queue.Queue()
    for _ in range(2):  # result chunks: one being written while the next is computed
        spare.put(np.empty(CHUNK_ELEMENTS * item, dtype=np.uint8))
    pending: queue.Queue[Any] = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while (job := pending.get()) is not None:
            name, start, buf, n = job
            try:
                if not failure:
                    writer.write_part(name, start, memoryview(buf)[:n])
            except BaseException as exc:  # re-raised by the caller
                failure.append(exc)
            spare.put(buf)

    thread = threading.Thread(target=write_loop, name="fusemerge-writer", daemon=True)
    thread.start()
    try:
        for task in tasks:
            kernel = chunk_kernel(plan, task, device)
            assert kernel is not None  # streamable() said so
            _merge_task(
                plan,
                writer,
                task,
                kernel,
                inputs,
                spare,
                pending,
                failure,
                allow_nonfinite,
            )
            on_bytes(task.read_bytes + task.write_bytes)
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return len(tasks)


def _merge_task(
    plan: MergePlan,
    writer: ShardedWriter,
    task: TensorTask,
    kernel: Kernel,
    inputs: list[np.ndarray],
    spare: queue.Queue[np.ndarray],
    pending: queue.Queue[Any],
    failure: list[BaseException],
    allow_nonfinite: bool,
) -> None:
    from fusemerge.checkpoint.finite import EXPONENT_MASKS, first_nonfinite_bits  # numba: not at import

    infos = [*task.inputs, *([task.base] if task.base is not None else [])]
    folders = [plan.folder_of(i) for i in infos]
    kind, size = _NUMPY[task.out_dtype], ITEM_SIZE[task.out_dtype]
    bits_kind = np.dtype(f"u{size}")
    mask = bits_kind.type(EXPONENT_MASKS[task.out_dtype])
    n = task.numel
    if n == 0:
        writer.write_part(task.name, 0, memoryview(b""))
        return
    for first in range(0, n, CHUNK_ELEMENTS):
        count = min(CHUNK_ELEMENTS, n - first)
        views = []
        for info, folder, buf in zip(infos, folders, inputs, strict=False):
            raw = buf[: count * size]
            folder.read_range(info.name, first * size, memoryview(raw))
            if not allow_nonfinite and first_nonfinite_bits(raw.view(bits_kind), mask) >= 0:
                raise FusemergeError(
                    "holds NaN or Inf values; pass --allow-nonfinite to merge it anyway",
                    file=info.file,
                    tensor=info.name,
                )
            views.append(raw.view(kind))
        if failure:
            raise failure[0]
        out = spare.get()
        base = views.pop() if task.base is not None else None
        kernel(tuple(views), base, out[: count * size].view(kind))
        pending.put((task.name, first * size, out, count * size))
