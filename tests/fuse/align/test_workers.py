"""The align step's worker pool: owners, errors coming back, a dead worker named, one worker in-process."""

from __future__ import annotations

import os

import pytest

from fusemerge.errors import FusemergeError
from fusemerge.fuse.align.workers import OwnedPool, default_workers


def _state(tag: str) -> dict:
    return {"tag": tag, "pid": os.getpid(), "seen": []}


def _record(state: dict, x: int) -> tuple[int, int, list[int]]:
    state["seen"].append(x)
    return state["pid"], x * x, list(state["seen"])


def _fail(state: dict, x: int) -> None:
    if x == 3:
        raise FusemergeError("bad chunk", file="data.jsonl", key="dataset")


def _die(state: dict, x: int) -> None:
    if x == 1:
        os._exit(7)


def test_tasks_run_on_their_owner_in_the_order_given():
    with OwnedPool(3, _state, ("t",)) as pool:
        results = dict(pool.run(_record, list(range(12)), owners=[i % 3 for i in range(12)]))
    assert sorted(results) == list(range(12))
    assert all(results[i][1] == i * i for i in range(12))
    pids = {w: {results[i][0] for i in range(w, 12, 3)} for w in range(3)}
    assert all(len(p) == 1 for p in pids.values()) and len(set().union(*pids.values())) == 3
    assert os.getpid() not in set().union(*pids.values())
    # each worker saw exactly its own tasks, in order: what the alignment cache of the count relies on
    assert [results[i][2] for i in (9, 10, 11)] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_one_worker_runs_in_this_process():
    with OwnedPool(1, _state, ("t",)) as pool:
        results = dict(pool.run(_record, [1, 2], owners=[0, 0]))
    assert {pid for pid, _, _ in results.values()} == {os.getpid()}


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_workers_user_error_comes_back_as_itself(start_method):
    with (
        pytest.raises(FusemergeError) as info,
        OwnedPool(2, _state, ("t",), start_method=start_method) as pool,
    ):
        list(pool.run(_fail, [1, 2, 3, 4], owners=[0, 1, 0, 1]))
    assert info.value.one_line() == "data.jsonl, key 'dataset': bad chunk"


def test_a_dead_worker_is_named_not_waited_for():
    with (
        pytest.raises(FusemergeError, match=r"align worker 1 died \(exit code 7\)"),
        OwnedPool(2, _state, ("t",)) as pool,
    ):
        list(pool.run(_die, [0, 1, 2, 3], owners=[0, 1, 0, 1]))


def test_default_is_the_usable_cores():
    assert default_workers() == len(os.sched_getaffinity(0))
    with pytest.raises(FusemergeError, match="alignment.workers"):
        OwnedPool(0, _state)
