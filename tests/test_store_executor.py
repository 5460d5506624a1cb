"""The priority executor: loads and prefetches run before saves, FIFO within a priority."""

from __future__ import annotations

import os
import threading

import pytest

from store.executor import Priority, PriorityExecutor


def test_loads_and_prefetches_jump_ahead_of_queued_saves():
    ex = PriorityExecutor(workers=1, save_workers=0)  # one queue for all
    gate = threading.Event()
    order: list[str] = []
    ex.submit(Priority.SAVE, gate.wait)  # occupies the only worker
    futures = [ex.submit(Priority.SAVE, order.append, f"save{i}") for i in range(3)]
    futures.append(ex.submit(Priority.PREFETCH, order.append, "prefetch"))
    futures.append(ex.submit(Priority.LOAD, order.append, "load"))
    gate.set()
    for f in futures:
        f.result(5)
    assert order == ["load", "prefetch", "save0", "save1", "save2"]
    ex.shutdown()


def test_saves_run_on_a_nicer_lane_of_their_own_that_never_holds_up_a_load():
    ex = PriorityExecutor(workers=1, save_workers=1, save_nice=7)
    gate, started = threading.Event(), threading.Event()
    order: list[str] = []
    ex.submit(Priority.SAVE, lambda: (started.set(), gate.wait()))  # occupies the save lane
    assert started.wait(5)
    saves = [ex.submit(Priority.SAVE, order.append, f"save{i}") for i in range(3)]
    assert ex.submit(Priority.LOAD, lambda: "loaded").result(5) == "loaded"  # not behind saves
    assert order == [] and ex.pending() == 3
    gate.set()
    for f in saves:
        f.result(5)
    assert order == ["save0", "save1", "save2"]
    nice = ex.submit(
        Priority.SAVE, lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    )
    load_nice = ex.submit(
        Priority.LOAD, lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    )
    base = load_nice.result(5)  # a load thread runs at the caller's niceness
    assert base == os.getpriority(os.PRIO_PROCESS, 0) and nice.result(5) == min(19, base + 7)
    ex.shutdown()


def test_exceptions_reach_the_future_and_the_worker_survives():
    ex = PriorityExecutor(workers=1)
    with pytest.raises(ZeroDivisionError):
        ex.submit(Priority.LOAD, lambda: 1 / 0).result(5)
    assert ex.submit(Priority.LOAD, lambda: 42).result(5) == 42
    ex.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        ex.submit(Priority.LOAD, lambda: 0)


def test_shutdown_finishes_queued_work():
    ex = PriorityExecutor(workers=2)
    done = []
    for i in range(20):
        ex.submit(Priority.SAVE, done.append, i)
    ex.shutdown(wait=True)
    assert sorted(done) == list(range(20)) and ex.pending() == 0
