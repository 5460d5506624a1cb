"""A thread pool that runs loads and prefetches before saves, and saves at low priority.

Why priorities: a load is on the critical path of a request (the engine waits for it),
a save is not (the KV is already in GPU memory). With one FIFO, a burst of saves from
finished requests would delay the next request's loads. Equal priorities run FIFO.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from enum import IntEnum
from typing import Any


class Priority(IntEnum):
    """Lower runs first."""

    LOAD = 0
    PREFETCH = 1
    SAVE = 2


class _Lane:
    """One priority queue and the threads draining it."""

    def __init__(self, name: str, workers: int, nice: int) -> None:
        self.queue: list[tuple[int, int, Callable[[], Any], Future]] = []
        self.cond = threading.Condition()
        self.closed = False
        self.nice = nice
        self.threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        if self.nice:
            _lower_priority(self.nice)
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                _, _, call, fut = heapq.heappop(self.queue)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(call())
            except BaseException as exc:  # delivered to whoever waits on the future
                fut.set_exception(exc)


def _lower_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps nicer (Linux: niceness is per thread)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


class PriorityExecutor:
    """Loads and prefetches on ``workers`` threads, lower priority value first; saves on
    ``save_workers`` threads of their own, ``save_nice`` steps nicer than the caller.

    Why a lane of their own for saves: a save waits for nothing but must not slow what
    does. Behind loads in one queue, a burst of saves still ran at the engine's priority
    once it reached the front, and on a machine with no spare core it took one from the
    engine's compute threads mid-prefill (measured on 2 vCPUs: cold prompts with the
    connector on 5-8% slower than off with the disk tier). Nice threads get a core when
    the engine leaves one idle. ``save_workers=0`` puts saves back in the load queue."""

    def __init__(
        self, workers: int = 4, name: str = "kvstore", save_workers: int = 1, save_nice: int = 10
    ) -> None:
        self._seq = itertools.count()
        self._loads = _Lane(name, workers, 0)
        self._saves = _Lane(f"{name}-save", save_workers, save_nice) if save_workers else None

    def submit(
        self, priority: Priority, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; lower ``priority`` first."""
        lane = self._saves if priority == Priority.SAVE and self._saves else self._loads
        fut: Future = Future()
        with lane.cond:
            if lane.closed:
                raise RuntimeError("executor is shut down")
            heapq.heappush(
                lane.queue, (int(priority), next(self._seq), lambda: fn(*args, **kwargs), fut)
            )
            lane.cond.notify()
        return fut

    def pending(self) -> int:
        return sum(len(lane.queue) for lane in self._lanes())

    def _lanes(self) -> list[_Lane]:
        return [self._loads] + ([self._saves] if self._saves else [])

    def shutdown(self, wait: bool = True) -> None:
        """Finish queued work, then stop the threads."""
        for lane in self._lanes():
            with lane.cond:
                lane.closed = True
                lane.cond.notify_all()
        if wait:
            for lane in self._lanes():
                for t in lane.threads:
                    t.join()
