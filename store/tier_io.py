"""Calls into one tier, as every part of the store makes them: timed, split, counted.

Each of put, promotion, demotion and get ends in a batch call on one tier's backend.
Doing those calls in one place keeps the latency histogram, the split of large batches
across I/O threads, and the written-bytes and put-failure counts (and the event that
announces what a tier now holds) the same whichever path wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from backends.base import Backend
from kvcore.chunk import Chunk
from store.config import StoreConfig
from store.metrics import StoreMetrics

SPLIT_BYTES = 1 << 20
"""A batch is split across I/O threads into parts of at least this many bytes..."""
SPLIT_MIN_CHUNK = 256 << 10
"""...and, for gets, only if its chunks average at least this size (puts of small chunks
wait on fsync, not on Python, so they split at any chunk size)."""


class Tier(NamedTuple):
    """One configured tier."""

    name: str
    backend: Backend
    write_policy: str
    verify: bool


Emit = Callable[[Tier, Sequence[str], bool], None]
"""``emit(tier, keys, removed)``: tell the store's listeners (``TieredStore._emit``)."""


class TierIO:
    """The I/O threads of one store, and its timed, counted calls into tiers."""

    def __init__(self, config: StoreConfig, metrics: StoreMetrics, emit: Emit) -> None:
        self.config = config
        self.metrics = metrics
        self.emit = emit
        self.pool = (
            ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvstore-io")
            if config.io_threads > 1
            else None
        )

    def timed(self, tier: Tier, op: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, its time observed as ``op`` on ``tier``."""
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.metrics.latency.labels(tier.name, op).observe(time.perf_counter() - start)

    def write(self, tier: Tier, chunks: Sequence[Chunk]) -> list[bool]:
        """Put ``chunks`` into ``tier``; count and announce what it stored."""
        if not chunks:
            return []
        nbytes = sum(c.header.nbytes for c in chunks)
        ok = self.timed(tier, "put", self.fan_out, tier, nbytes, 0, tier.backend.put, list(chunks))
        written = sum(c.header.nbytes for c, good in zip(chunks, ok, strict=True) if good)
        self.metrics.bytes_written.labels(tier.name).inc(written)
        self.metrics.put_failures.labels(tier.name).inc(len(ok) - sum(ok))
        self.emit(tier, [c.header.key for c, good in zip(chunks, ok, strict=True) if good], False)
        return ok

    def fan_out(
        self,
        tier: Tier,
        nbytes: int,
        min_chunk: int,
        fn: Any,
        items: list[Any],
        *extra: list[Any] | None,
    ) -> list[Any]:
        """``fn(items, *extra)``, split across the I/O threads when the batch is large.

        Why: file reads release the GIL, verification (xxh3) does not. Several threads
        each reading and verifying part of a batch overlap one's reads with another's
        hashing (and one's fsync with another's write), instead of read-all-then-hash-all.
        Only for backends marked ``parallel_io``: redis-py parses replies in Python, so
        threads there would mostly contend for the GIL.
        """
        parts = min(len(items), self.config.io_threads, nbytes // SPLIT_BYTES)
        small = nbytes < len(items) * min_chunk
        if self.pool is None or not tier.backend.parallel_io or parts < 2 or small:
            # Reading small chunks costs Python time, not I/O: threads would only fight
            # for the GIL (measured: 64 KiB disk gets 0.78x of raw reads unsplit, 0.59x split).
            return fn(items, *extra)
        bounds = [len(items) * i // parts for i in range(parts + 1)]
        futures = [
            self.pool.submit(fn, items[a:b], *(e[a:b] if e is not None else None for e in extra))
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        return [x for f in futures for x in f.result()]

    def close(self) -> None:
        """Finish the I/O threads' work."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
