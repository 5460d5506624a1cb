"""Store lookups off the engine loop: a slow or stopped server stalls only the requests
that wait on it.

The scheduler asks ``get_num_new_matched_tokens`` on the engine loop, each step, for
each waiting request it reaches. The tiers in this process (gpu, cpu, disk, gds) answer
there and then. When they do not hold the whole prompt and a networked tier (a kvstore
daemon, Redis/Valkey) may be asked, the rest of the lookup runs on a small thread pool
and the connector answers ``None``, vLLM's "not yet": the scheduler skips the request
this step (it keeps its place in the queue), schedules the others, and asks again next
step. A request waits at most ``deadline`` seconds; past it, or when the lookup fails,
it goes on with what the local tiers hold (the rest recomputes) and the late answer is
ignored. A networked tier backing off after an error is not asked: the answer is
immediate.

::

    engine loop, step n                     lookup pool
    local = locate(keys, local_only=True)
    start(keys, local)  -> None  ---------> locate(keys, found=local)   (RPC, deadline)
    step n+1.. answer() -> None             ...
    step n+k   answer() -> tiers  <-------- done (or: deadline passed -> local)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from store.tiered import TieredStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lookup:
    """One request's lookup: in flight on the pool until ``answer`` is set."""

    future: Future[list[str]]
    local: list[str]  # tiers of the leading chunks the local tiers held at the start
    expires: float  # time.monotonic() at which the request stops waiting for it
    answer: list[str] | None = None  # tier of each leading stored chunk, once known


class StoreLookups:
    """Lookups of ``store``'s networked tiers on ``workers`` threads, each waited for at
    most ``deadline`` seconds. Queued lookups beyond the workers wait their turn, their
    deadlines running: a stopped server costs each waiting request one deadline at most,
    and the first failure puts its tier in back-off, after which lookups answer at once."""

    def __init__(self, store: TieredStore, deadline: float, workers: int = 2) -> None:
        self.store = store
        self.deadline = deadline
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kv-lookup")

    def start(
        self, keys: Sequence[str], local: list[str], wanted: Callable[[], bool]
    ) -> Lookup | None:
        """Look ``keys`` up past the ``local`` answer on the pool; None when nothing is
        worth waiting for (the local tiers hold every key, or no networked tier may be
        asked now). ``wanted()`` turns False once the request is gone: a lookup still
        queued then asks nothing."""
        if len(local) >= len(keys) or not self.store.networked_reachable():
            return None
        future = self._pool.submit(self._locate, list(keys), local, wanted)
        return Lookup(future, local, time.monotonic() + self.deadline)

    def _locate(self, keys: list[str], local: list[str], wanted: Callable[[], bool]) -> list[str]:
        if not wanted():
            return local
        return self.store.locate(keys, found=local)

    def answer(self, lookup: Lookup) -> list[str] | None:
        """The lookup's answer, or None while it runs and its deadline has not passed.
        A failed or late lookup answers with the local tiers' part."""
        if lookup.answer is not None:
            return lookup.answer
        future = lookup.future
        if future.done():
            try:
                lookup.answer = future.result()
            except Exception as exc:  # a backend bug: its tiers' errors are misses already
                log.warning("store lookup failed (%s); using the local tiers' answer", exc)
                lookup.answer = lookup.local
        elif time.monotonic() >= lookup.expires:
            future.cancel()  # if still queued; a running one finishes and is ignored
            log.warning(
                "store lookup not answered within %.1fs; recomputing what the "
                "local tiers do not hold",
                self.deadline,
            )
            lookup.answer = lookup.local
        return lookup.answer

    def close(self) -> None:
        """Drop queued lookups; running ones end at their tiers' own deadlines."""
        self._pool.shutdown(wait=False, cancel_futures=True)
