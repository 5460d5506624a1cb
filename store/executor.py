"""A thread pool that runs loads and prefetches before saves.

Why priorities: a load is on the critical path of a request (the engine waits for it),
a save is not (the KV is already in GPU memory). With one FIFO, a burst of saves from
finished requests would delay the next request's loads. Equal priorities run FIFO.
"""

from __future__ import annotations

import heapq
import itertools
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


class PriorityExecutor:
    """``workers`` daemon threads draining one priority queue."""

    def __init__(self, workers: int = 4, name: str = "kvstore") -> None:
        self._queue: list[tuple[int, int, Callable[[], Any], Future]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(
        self, priority: Priority, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; lower ``priority`` first."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("executor is shut down")
            heapq.heappush(
                self._queue, (int(priority), next(self._seq), lambda: fn(*args, **kwargs), fut)
            )
            self._cond.notify()
        return fut

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                _, _, call, fut = heapq.heappop(self._queue)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(call())
            except BaseException as exc:  # delivered to whoever waits on the future
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True) -> None:
        """Finish queued work, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join()
