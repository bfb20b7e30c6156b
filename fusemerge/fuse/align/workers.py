"""Worker processes for the align step: tasks with a fixed owner, results back to the parent.

    with OwnedPool(workers=4, init=make_state, init_args=(spec,)) as pool:
        for task_id, result in pool.run(count_chunk, payloads, owners=[i % 4 for i in range(len(payloads))]):
            ...

Why processes: dtw, the offsets walk, tokenization and the transfer are CPU-bound Python and numba code;
threads would share one interpreter. Why a fixed owner per task instead of a free-for-all pool: the
co-alignment count and the transfer visit the same chunks of sequences, and each worker keeps the
alignments it computed for the count (`ALIGNMENT_CACHE`) to spare the transfer a second dtw; that only
pays if chunk c goes to the same worker both times. Chunks are small and owned round-robin, so the load
still spreads evenly.

The workers only compute: the parent writes every store shard and the mapping file, so a store is
written by one process, as with one worker, and the kill -9 / resume contract of the stores holds
unchanged. A worker dies with its parent (Linux: `PR_SET_PDEATHSIG`; elsewhere it exits at its next
task read, when the pipe closes). A worker that dies (out of memory, a signal) is reported as a
`FusemergeError` naming `alignment.workers`; a worker's own `FusemergeError` comes back as itself.

Start method: `fork` where the platform has it (Linux: the state is inherited, nothing pickled, no
import cost; workers touch no torch, OpenMP or CUDA state), else `spawn`, for which the state's
arguments, the task functions and payloads are picklable.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fusemerge.errors import FusemergeError

DEPTH = 2  # tasks in flight per worker: one computing, one queued, so a worker never waits on the parent


def default_workers() -> int:
    """Every core this process may run on (its CPU affinity, as under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_start_method() -> str:
    return "fork" if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods() else "spawn"


class OwnedPool:
    """`workers` processes, each holding the state `init(*init_args)` built once; tasks go to owners.

    With `workers == 1` nothing is started: tasks run in this process on a state built here, so one
    worker is exactly the plain loop (and the reference the parallel runs are compared with).
    """

    def __init__(
        self,
        workers: int,
        init: Callable[..., Any],
        init_args: tuple[Any, ...] = (),
        *,
        start_method: str | None = None,
    ) -> None:
        if workers < 1:
            raise FusemergeError(f"{workers} workers: at least 1", key="alignment.workers")
        self.workers = workers
        self._init, self._init_args = init, init_args
        self._start_method = start_method or default_start_method()
        self._local: Any = None
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None

    def __enter__(self) -> OwnedPool:
        if self.workers == 1:
            self._local = self._init(*self._init_args)
            return self
        ctx = mp.get_context(self._start_method)
        self._results = ctx.Queue()
        for w in range(self.workers):
            tasks = ctx.SimpleQueue()
            proc = ctx.Process(
                target=_worker_main,
                args=(w, os.getpid(), tasks, self._results, self._init, self._init_args),
                name=f"fusemerge-align-{w}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
            self._tasks.append(tasks)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(abort=exc_type is not None)

    def close(self, *, abort: bool = False) -> None:
        """Stop the workers: politely after a clean run, at once after an error or Ctrl-C."""
        for proc, tasks in zip(self._procs, self._tasks, strict=True):
            if abort:
                proc.terminate()
            elif proc.is_alive():
                tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for tasks in self._tasks:
            tasks.close()
        if self._results is not None:
            self._results.close()
            self._results.join_thread()
        self._procs, self._tasks, self._results, self._local = [], [], None, None

    def run(
        self, fn: Callable[[Any, Any], Any], payloads: Sequence[Any], owners: Sequence[int]
    ) -> Iterator[tuple[int, Any]]:
        """`fn(state, payloads[i])` for every i on worker `owners[i]`; yields (i, result) as they finish.

        Each worker takes its own tasks in the order given; the order of the yields across workers is
        whatever finished first, so a caller that needs an order restores it by the index.
        """
        if len(owners) != len(payloads):
            raise ValueError(f"{len(owners)} owners for {len(payloads)} tasks")
        if self.workers == 1:
            for i, payload in enumerate(payloads):
                yield i, fn(self._local, payload)
            return
        if not self._procs:
            raise RuntimeError("OwnedPool.run outside its `with` block")
        todo: list[list[int]] = [[] for _ in range(self.workers)]
        for i, owner in enumerate(owners):
            todo[owner % self.workers].append(i)
        for mine in todo:
            mine.reverse()  # pop() from the end takes them in the order given
        busy = [0] * self.workers
        left = len(payloads)

        def feed(w: int) -> None:
            while busy[w] < DEPTH and todo[w]:
                i = todo[w].pop()
                self._tasks[w].put((i, fn, payloads[i]))
                busy[w] += 1

        for w in range(self.workers):
            feed(w)
        while left:
            try:
                w, i, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                self._check_alive()
                continue
            if not ok:
                raise _rebuild(value)
            busy[w] -= 1
            left -= 1
            feed(w)
            yield i, value

    def _check_alive(self) -> None:
        for w, proc in enumerate(self._procs):
            if proc.exitcode is not None:
                code = proc.exitcode
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                raise FusemergeError(
                    f"align worker {w} died ({how}{', out of memory?' if code == -signal.SIGKILL else ''}); "
                    "rerun to resume (finished shards are kept), with fewer workers if memory is short",
                    key="alignment.workers",
                )


def _worker_main(
    w: int, parent: int, tasks: Any, results: Any, init: Callable[..., Any], init_args: tuple[Any, ...]
) -> None:
    """One worker: build the state, then run tasks until the parent says stop (None) or goes away."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    try:
        state = init(*init_args)
    except BaseException as exc:  # reported on the first task, which is where the parent listens
        state, failure = None, _describe(exc)
    else:
        failure = None
    while True:
        try:
            task = tasks.get()
        except (EOFError, OSError):
            return  # the parent is gone
        if task is None:
            return
        i, fn, payload = task
        if failure is not None:
            results.put((w, i, False, failure))
            continue
        try:
            value = fn(state, payload)
        except BaseException as exc:
            results.put((w, i, False, _describe(exc)))
        else:
            results.put((w, i, True, value))


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _describe(exc: BaseException) -> tuple[str, Any]:
    if isinstance(exc, FusemergeError):
        return ("user", (exc.message, exc.file, exc.line, exc.key, exc.tensor))
    return ("bug", "".join(traceback.format_exception(exc)))


def _rebuild(value: tuple[str, Any]) -> BaseException:
    kind, detail = value
    if kind == "user":
        message, file, line, key, tensor = detail
        return FusemergeError(message, file=file, line=line, key=key, tensor=tensor)
    return RuntimeError(f"an align worker failed:\n{detail}")
