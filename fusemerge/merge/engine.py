"""Executes a merge plan as a stream: read one tensor's inputs, merge, cast, write, free.

Three stages overlap: a reader thread prefetches the next tensors' inputs (bounded in bytes, so a huge
embedding is never double-buffered), the calling thread computes, and a writer thread puts finished tensors
into their place in the shard files. File reads, writes and torch kernels all release the GIL, so the
stages really run in parallel. Peak memory is a few tensors, whatever the model size.
Linear and task arithmetic on CPU bf16/float32 do not come here tensor by tensor: `merge.elementwise`
streams them chunk-wise through the CPU cache, which is what brings them near their I/O floor.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fusemerge.checkpoint.dtypes import torch_dtype
from fusemerge.checkpoint.finite import all_finite
from fusemerge.checkpoint.reader import TensorInfo
from fusemerge.checkpoint.writer import ShardedWriter
from fusemerge.errors import FusemergeError
from fusemerge.merge.buffers import BufferPool
from fusemerge.merge.kernels.chunks import outputs_from
from fusemerge.merge.plan import DEFAULT_PREFETCH_BYTES, PREFETCH_TENSORS, MergePlan, TensorTask
from fusemerge.merge.seeds import derive_seed
from fusemerge.progress import progress_bar

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)
_DONE = object()
READ_THREADS = 3


@dataclass
class _Loaded:
    task: TensorTask
    inputs: list[torch.Tensor]
    base: torch.Tensor | None
    nbytes: int
    buffers: list[torch.Tensor]  # the pool's buffers the inputs were read into, given back after use


class _ByteBudget:
    """Blocks the reader once `limit` bytes or `max_items` tensors are in flight; one is always allowed."""

    def __init__(self, limit: int, max_items: int = PREFETCH_TENSORS) -> None:
        self.limit = limit
        self.max_items = max_items
        self.used = 0
        self.items = 0
        self.cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        with self.cond:
            while (
                self.items > 0
                and (self.used + n > self.limit or self.items >= self.max_items)
                and not stop.is_set()
            ):
                self.cond.wait(0.1)
            self.used += n
            self.items += 1
            return not stop.is_set()

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.items -= 1
            self.cond.notify_all()


class _Stage(threading.Thread):
    """A daemon thread whose exception is re-raised in the caller."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # re-raised by the caller
            self.error = exc


def _read_task(
    plan: MergePlan, task: TensorTask, allow_nonfinite: bool, pool: ThreadPoolExecutor, buffers: BufferPool
) -> _Loaded:
    """Read one task's inputs into reused buffers; the models' tensors are read concurrently (preadv
    releases the GIL, and one thread copying out of the page cache is slower than the merge arithmetic
    that follows)."""
    if task.copy_from is not None:
        info = task.copy_from
        buf = buffers.take(info.nbytes)
        return _Loaded(task, [plan.folder_of(info).read(task.name, buf)], None, task.read_bytes, [buf])
    infos = [*task.inputs, *([task.base] if task.base is not None else [])]
    taken = [buffers.take(info.nbytes) for info in infos]
    tensors = list(
        pool.map(lambda pair: _read_checked(plan, *pair, allow_nonfinite), zip(infos, taken, strict=True))
    )
    base = tensors.pop() if task.base is not None else None
    return _Loaded(task, tensors, base, task.read_bytes, taken)


def _read_checked(
    plan: MergePlan, info: TensorInfo, buf: torch.Tensor, allow_nonfinite: bool
) -> torch.Tensor:
    """Read a float tensor, refusing NaN/Inf: merging them silently would spread them into the output."""

    tensor = plan.folder_of(info).read(info.name, buf)
    if not allow_nonfinite and not all_finite(tensor):
        raise FusemergeError(
            "holds NaN or Inf values; pass --allow-nonfinite to merge it anyway",
            file=info.file,
            tensor=info.name,
        )
    return tensor


def iter_loaded(
    plan: MergePlan,
    tasks: list[TensorTask],
    prefetch_bytes: int,
    *,
    allow_nonfinite: bool = False,
    buffers: BufferPool | None = None,
) -> Iterator[_Loaded]:
    """Yield each task's inputs in order, read ahead by a background thread.

    Once the consumer asks for the next task, the previous one's buffers go back to the pool: a consumer
    that keeps an input alive (a result sharing its memory) takes that buffer out of `buffers` first.
    """
    budget = _ByteBudget(prefetch_bytes)
    pool_of_buffers = buffers if buffers is not None else _pool_for(tasks, prefetch_bytes)
    ready: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def reader() -> None:
        try:
            with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="fusemerge-read") as pool:
                for task in tasks:
                    if not budget.acquire(task.read_bytes, stop):
                        return
                    ready.put(_read_task(plan, task, allow_nonfinite, pool, pool_of_buffers))
        finally:
            ready.put(_DONE)

    thread = _Stage(reader, "fusemerge-reader")
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                if thread.error is not None:
                    raise thread.error
                return
            try:
                yield item
            finally:
                for buf in item.buffers:
                    pool_of_buffers.give(buf)
                item.buffers.clear()
                budget.release(item.nbytes)
    finally:
        stop.set()
        thread.join()


def _pool_for(tasks: list[TensorTask], prefetch_bytes: int) -> BufferPool:
    """Room for what the prefetch budget lets be in flight (one task always, however large)."""
    return BufferPool(max([prefetch_bytes, *(t.read_bytes for t in tasks)]))


def _sharing(result: torch.Tensor, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
    """The buffers whose memory `result` is (a copied tensor, a passthrough): the writer gives them back."""
    ptr = result.untyped_storage().data_ptr()
    return [b for b in buffers if b.untyped_storage().data_ptr() == ptr]


def merge_tensor(plan: MergePlan, loaded: _Loaded, device: str, group_stats: Any = None) -> torch.Tensor:
    """Compute one output tensor on `device`; returns it in the output dtype on the CPU."""

    task = loaded.task
    out_dtype = torch_dtype(task.out_dtype)
    if task.copy_from is not None:
        return loaded.inputs[0].to(out_dtype)
    work, inputs, base = _working_inputs(loaded, device)
    kwargs: dict[str, Any] = {**task.shared, **task.per_model}
    if group_stats is not None:
        kwargs["group_stats"] = group_stats
    if plan.method.random:
        kwargs["seed"] = derive_seed(plan.random_seed, task.name)
    try:
        result = plan.method.fn(inputs, base, **kwargs)
    except FusemergeError as exc:
        raise FusemergeError(exc.message, key=exc.key, tensor=task.name) from None
    # Round through the working dtype first, as mergekit does (its result lives in the recipe dtype).
    return result.to(work).to(out_dtype).to("cpu")


def _working_inputs(
    loaded: _Loaded, device: str
) -> tuple[torch.dtype, list[torch.Tensor], torch.Tensor | None]:
    """The task's inputs in its working dtype (the recipe's `dtype`, else the inputs' promoted one) on
    `device`: what both the statistics pass and the merge hand to a method."""
    task = loaded.task
    work = torch_dtype(task.work_dtype) if task.work_dtype else _promoted([*loaded.inputs, loaded.base])
    inputs = [x.to(device=device, dtype=work) for x in loaded.inputs]
    base = loaded.base.to(device=device, dtype=work) if loaded.base is not None else None
    return work, inputs, base


def _promoted(tensors: list[torch.Tensor | None]) -> torch.dtype:
    import torch

    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    for t in present[1:]:
        try:
            dtype = torch.promote_types(dtype, t.dtype)
        except RuntimeError:  # float8 types do not promote; compute such mixes in float32
            return torch.float32
    return dtype


def group_statistics(
    plan: MergePlan,
    device: str,
    *,
    prefetch_bytes: int,
    on_bytes: Callable[[int], None],
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """First pass for methods whose weights pool statistics over several tensors (VaRM layer/model)."""
    import torch

    totals: dict[str, Any] = {}
    tasks = [t for t in plan.tasks if t.copy_from is None]
    for loaded in iter_loaded(plan, tasks, prefetch_bytes, allow_nonfinite=allow_nonfinite):
        task = loaded.task
        _, inputs, base = _working_inputs(loaded, device)
        stats = plan.method.stats(inputs, base, **task.shared, **task.per_model)
        key = task.group or task.name
        totals[key] = stats if key not in totals else totals[key] + stats
        on_bytes(loaded.nbytes)
        del inputs, base, loaded
    return {k: v.to(torch.float64) for k, v in totals.items()}


def execute(
    plan: MergePlan,
    writer: ShardedWriter,
    *,
    skip_shards: set[str],
    device: str = "cpu",
    progress: bool = True,
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
    allow_nonfinite: bool = False,
) -> int:
    """Merge every tensor of the shards not in `skip_shards`; returns the number of tensors written."""
    skip_names = {t.name for s in plan.shards if s.filename in skip_shards for t in s.tensors}
    tasks = [t for t in plan.tasks if t.name not in skip_names]
    stats: dict[str, Any] = {}
    if plan.needs_group_pass and tasks:
        with progress_bar(
            sum(t.read_bytes for t in plan.tasks if t.copy_from is None),
            "statistics",
            enabled=progress,
            unit="B",
            unit_scale=True,
        ) as bar:
            stats = group_statistics(
                plan,
                device,
                prefetch_bytes=prefetch_bytes,
                on_bytes=bar.update,
                allow_nonfinite=allow_nonfinite,
            )

    from fusemerge.merge.elementwise import execute_streamed, streamable

    if not plan.needs_group_pass and streamable(plan, tasks, device):
        total = sum(t.read_bytes + t.write_bytes for t in tasks)
        with progress_bar(total, "merging", enabled=progress, unit="B", unit_scale=True) as streamed:
            try:
                return execute_streamed(
                    plan,
                    writer,
                    tasks,
                    device=device,
                    allow_nonfinite=allow_nonfinite,
                    on_bytes=streamed.update,
                )
            finally:
                writer.close()

    written: queue.Queue[Any] = queue.Queue(maxsize=2)

    buffers = _pool_for(tasks, prefetch_bytes)
    lent: list[torch.Tensor] = []

    def take_output(nbytes: int) -> torch.Tensor:
        buf = buffers.take(nbytes)
        lent.append(buf)
        return buf

    def write_loop() -> None:
        while True:
            item = written.get()
            if item is _DONE:
                return
            name, result, held = item
            writer.write(name, result)
            del result, item
            for buf in held:
                buffers.give(buf)

    write_stage = _Stage(write_loop, "fusemerge-writer")
    write_stage.start()
    total_bytes = sum(t.read_bytes + t.write_bytes for t in tasks)
    bar = progress_bar(total_bytes, "merging", enabled=progress, unit="B", unit_scale=True)
    count = 0
    try:
        loads = iter_loaded(plan, tasks, prefetch_bytes, allow_nonfinite=allow_nonfinite, buffers=buffers)
        for loaded in loads:
            task = loaded.task
            group = stats.get(task.group) if task.group not in (None, task.name) else None
            with outputs_from(take_output):
                result = merge_tensor(plan, loaded, device, group)
            # Buffers the result is (a fused kernel's output, a passthrough input) go back once written;
            # the others now (inputs when the next task is asked for, a method's unused outputs here).
            held = _sharing(result, [*loaded.buffers, *lent])
            loaded.buffers[:] = [b for b in loaded.buffers if all(b is not h for h in held)]
            for buf in lent:
                if all(buf is not h for h in held):
                    buffers.give(buf)
            lent.clear()
            del loaded
            _put(written, (task.name, result, held), write_stage)
            del result
            count += 1
            bar.update(task.read_bytes + task.write_bytes)
            bar.set_postfix_str(f"tensors {count}/{len(tasks)}", refresh=False)
        _put(written, _DONE, write_stage)
        write_stage.join()
        if write_stage.error is not None:
            raise write_stage.error
    finally:
        bar.close()
        if write_stage.is_alive():
            # Drain so the writer can see the end marker, then let it finish its current write.
            while True:
                try:
                    written.get_nowait()
                except queue.Empty:
                    break
            written.put(_DONE)
            write_stage.join()
        writer.close()
    return count


def _put(q: queue.Queue[Any], item: Any, stage: _Stage) -> None:
    while True:
        if stage.error is not None:
            raise stage.error
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue
