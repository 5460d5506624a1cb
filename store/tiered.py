"""TieredStore: ordered tiers behind one get/put/lookup, with promotion and demotion.

Tiers are fastest first (gpu, cpu, disk/gds, redis). Rules:

* ``lookup`` answers the longest stored prefix across tiers. A chunk counts only if
  every earlier chunk is found in some tier (a prefix is useless past its first hole)::

      keys    c0   c1   c2   c3
      cpu     x         x          -> lookup = 3 (c0 cpu, c1 disk, c2 cpu; c3 nowhere)
      disk         x

* ``put`` writes every chunk to the first tier and to each ``write_through`` tier; a
  ``write_back`` tier gets chunks when the tier above evicts them (demotion), or
  directly when no tier above could take them.
* ``get`` asks tiers in order, verifies what comes back (key, fingerprint, xxh3 where
  the tier's ``verify`` is on), and promotes hits from lower tiers into the tiers above.
  A corrupt object is a miss, a ``checksum_failures`` count, and is deleted.
* Pinned chunks (``pin``: being loaded, or leased for a decode node) are never evicted.
* Users that mirror where chunks are (the connector's KV events) ``subscribe`` to
  ``ChunkEvent``: a tier stored keys (put, promotion, demotion) or no longer holds them
  (eviction, delete, a corrupt object dropped).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry

from backends.base import Backend, Corrupt
from backends.capabilities import ChecksIntegrity, Lends, Reserves
from kvcore.chunk import CheckedChunk, Chunk, ChunkError, make_chunk, verify
from kvcore.keys import ModelFingerprint
from store.build import build_tiers
from store.config import StoreConfig
from store.executor import Priority, PriorityExecutor
from store.metrics import StoreMetrics, TierStats

log = logging.getLogger(__name__)
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


class ChunkEvent(NamedTuple):
    """Tier ``tier`` now holds ``keys`` (``removed`` False) or no longer does (True).

    A removal may name keys the tier did not hold (``delete`` does not say which were
    present); a listener that mirrors residency ignores those.
    """

    tier: str
    keys: tuple[str, ...]
    removed: bool


ChunkListener = Callable[[ChunkEvent], None]
"""Runs on the thread that changed the tier, sometimes under that tier's lock: it must
be quick and must not call the store."""

LayerSink = Callable[[int, list[Chunk | None]], bool]
"""``sink(layer, chunks)``: layer ``layer`` of every verified chunk in ``chunks`` may be
read now. Returning False stops the delivery of later layers."""


class PutResult(int):
    """What a ``put`` stored. As an int: how many chunks some tier now holds (what ``put``
    always returned). ``by_tier[name][i]``: whether tier ``name`` stored chunk ``i`` in
    this put (False also where the tier was not asked: a write-back tier only gets what
    no tier above could take)."""

    stored: list[bool]
    by_tier: dict[str, list[bool]]

    def __new__(cls, stored: list[bool], by_tier: dict[str, list[bool]]) -> PutResult:
        self = super().__new__(cls, sum(stored))
        self.stored, self.by_tier = stored, by_tier
        return self


class TieredStore:
    """The store an engine or the daemon uses. ``fingerprint`` binds every chunk read to
    one model; ``backends`` overrides construction from config (tests, the daemon)."""

    def __init__(
        self,
        config: StoreConfig,
        fingerprint: ModelFingerprint | bytes | None = None,
        backends: dict[str, Backend] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        if isinstance(fingerprint, ModelFingerprint):
            fingerprint = fingerprint.digest()
        self.fingerprint: bytes | None = fingerprint
        built = backends if backends is not None else build_tiers(config)
        self.tiers = [
            Tier(n, b, config.write_policy_of(n), config.tier(n).verify) for n, b in built.items()
        ]
        self.metrics = StoreMetrics(lambda: {t.name: t.backend for t in self.tiers}, registry)
        # What the first tier can do beyond Backend (backends/capabilities.py), asked once:
        # an isinstance of a protocol costs microseconds.
        first = self.tiers[0] if self.tiers else None
        self._lender = first.backend if first and not first.verify and isinstance(
            first.backend, Lends) else None  # fmt: skip
        self._reserver = first.backend if first and isinstance(first.backend, Reserves) else None
        self._executor = PriorityExecutor(config.workers, save_nice=config.save_nice)
        self._io = (
            ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvstore-io")
            if config.io_threads > 1
            else None
        )
        self._listeners: list[ChunkListener] = []
        self._wire_evictions()

    def _wire_evictions(self) -> None:
        """Eviction hooks: demote into a write-back tier below, and tell the listeners.

        A tier with neither keeps no hook: a backend copies a victim's payload out only
        for a hook, and a hook that only reports pays that copy (see ``subscribe``).
        """
        for i, tier in enumerate(self.tiers):
            below = self.tiers[i + 1] if i + 1 < len(self.tiers) else None
            lower = below if below is not None and below.write_policy == "write_back" else None
            if lower is not None or (self._listeners and tier.backend.bounded):
                tier.backend.on_evict = functools.partial(self._evicted, tier, lower)

    def _evicted(self, tier: Tier, lower: Tier | None, chunk: Chunk) -> None:
        if lower is not None:  # demote first: a listener sees a move, never a gap
            self._write(lower, [chunk])
        self._emit(tier, [chunk.key], removed=True)

    # -- events ---------------------------------------------------------------------
    def subscribe(self, listener: ChunkListener) -> None:
        """Call ``listener`` with every ``ChunkEvent`` from now on.

        Cost: evictions from a bounded tier that demotes nowhere now copy the victim's
        payload out for the hook (the backends hand hooks whole chunks).
        """
        self._listeners.append(listener)
        self._wire_evictions()

    def _emit(self, tier: Tier, keys: Sequence[str], removed: bool) -> None:
        if not keys:
            return
        event = ChunkEvent(tier.name, tuple(keys), removed)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not fail a put or an eviction
                log.warning("chunk event listener failed", exc_info=True)

    # -- chunks ---------------------------------------------------------------------
    def make_chunk(self, key: str, kv: Any, num_tokens: int) -> Chunk:
        """A chunk of this store's model from ``kv`` ``[layers, 2, tokens, kv_heads, head_dim]``."""
        if self.fingerprint is None:
            raise ValueError("make_chunk needs a store constructed with a model fingerprint")
        return make_chunk(key, self.fingerprint, kv, num_tokens)

    # -- lookup ---------------------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> int:
        """Number of leading ``keys`` stored somewhere, each tier asked for the rest."""
        return len(self.locate(keys))

    def locate(
        self, keys: Sequence[str], local_only: bool = False, found: Sequence[str] = ()
    ) -> list[str]:
        """The tier name holding each of the leading stored ``keys`` (``lookup`` chunks).

        ``local_only``: ask only the tiers in this process (not ``networked``), an answer
        that never waits on a server. ``found``: the tiers of a leading run already
        located (a ``local_only`` answer); only the keys after it are asked for.
        """
        tiers = [t for t in self.tiers if not (local_only and t.backend.networked)]
        located = list(found)
        while len(located) < len(keys):
            before = len(located)
            for tier in tiers:
                n = self._timed(tier, "contains", tier.backend.contains, keys[len(located) :])
                located += [tier.name] * n
                if len(located) == len(keys):
                    break
            if len(located) == before:
                break
        return located

    def networked_reachable(self) -> bool:
        """Whether a ``networked`` tier may be asked now (one is configured and not
        backing off after an error): only then can a lookup wait on a server."""
        return any(t.backend.networked and t.backend.available() for t in self.tiers)

    # -- put ------------------------------------------------------------------------
    def put(self, chunks: Sequence[Chunk]) -> PutResult:
        """Store chunks per the write policies; the result counts the chunks some tier now
        holds and says, per tier, which ones it stored."""
        stored = [False] * len(chunks)
        by_tier: dict[str, list[bool]] = {}
        for i, tier in enumerate(self.tiers):
            if i == 0 or tier.write_policy == "write_through":
                todo = list(range(len(chunks)))
            else:  # write_back: only what no tier above could take (too big, all pinned)
                todo = [j for j, ok in enumerate(stored) if not ok]
            col = by_tier[tier.name] = [False] * len(chunks)
            for j, ok in zip(todo, self._write(tier, [chunks[j] for j in todo]), strict=True):
                col[j] = ok
                stored[j] = stored[j] or ok
        return PutResult(stored, by_tier)

    def _write(self, tier: Tier, chunks: Sequence[Chunk]) -> list[bool]:
        if not chunks:
            return []
        nbytes = sum(c.header.nbytes for c in chunks)
        ok = self._timed(
            tier, "put", self._fan_out, tier, nbytes, 0, tier.backend.put, list(chunks)
        )
        written = sum(c.header.nbytes for c, good in zip(chunks, ok, strict=True) if good)
        self.metrics.bytes_written.labels(tier.name).inc(written)
        self.metrics.put_failures.labels(tier.name).inc(len(ok) - sum(ok))
        self._emit(tier, [c.header.key for c, good in zip(chunks, ok, strict=True) if good], False)
        return ok

    # -- get ------------------------------------------------------------------------
    def get(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> list[Chunk | None]:
        """Each key's chunk (into ``outs[i]`` when given) or ``None``; hits found in lower
        tiers are promoted into every tier above."""
        results: list[Chunk | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not todo:
                break
            tier_keys = [keys[i] for i in todo]
            tier_outs = [outs[i] for i in todo] if outs is not None else None
            nbytes = sum(_nbytes(o) for o in tier_outs) if tier_outs is not None else 0
            fetch = functools.partial(self._get_verified, tier)
            found = self._timed(
                tier,
                "get",
                self._fan_out,
                tier,
                nbytes,
                SPLIT_MIN_CHUNK,
                fetch,
                tier_keys,
                tier_outs,
            )
            for i, chunk in zip(todo, found, strict=True):
                results[i] = chunk
            hits = [c for c in found if c is not None]
            if hits and level:
                self._promote(level, hits)
            todo = [i for i in todo if results[i] is None]
        return results

    def borrow(self, keys: Sequence[str]) -> list[tuple[Any, list[Any]] | None]:
        """Hits in the first tier, when it can lend them (a host ``cpu`` tier that does
        not verify reads): (header, read-only views of its pages), pinned until
        ``give_back`` of those keys. Everything else is None: ``get`` it."""
        return self._lend_first("borrow", keys)

    def lend(self, keys: Sequence[str]) -> list[tuple[Any, list[Any]] | None]:
        """``borrow``, with (header, runs of the first tier's pool) for each hit: for a
        reader that maps that pool itself (``shared_pool``)."""
        return self._lend_first("lend", keys)

    def shared_pool(self) -> Any:
        """The first tier's SharedBuffer when its pool is in shared memory and it lends
        hits (so same-host clients may read them in place), else None."""
        return None if self._lender is None else self._lender.shared

    def _lend_first(self, method: str, keys: Sequence[str]) -> list[Any]:
        lender = self._lender
        if lender is None:
            return [None] * len(keys)
        tier = self.tiers[0]
        start = time.perf_counter()
        lent = lender.lend(keys) if method == "lend" else lender.borrow(keys)
        hits = [h for h in lent if h is not None]
        self.metrics.hits.labels(tier.name).inc(len(hits))
        self.metrics.bytes_read.labels(tier.name).inc(sum(h[0].nbytes for h in hits))
        self.metrics.latency.labels(tier.name, "get").observe(time.perf_counter() - start)
        return lent

    def reserve(self, headers: Sequence[Any]) -> list[list[Any] | None]:
        """Writable page views in the first tier for each new chunk, when the store can
        take chunks that way (its first tier reserves and no lower tier is written
        through); fill them, then ``commit``. None for a chunk: ``put`` it instead."""
        if self._reserver is None or not self.can_reserve():
            return [None] * len(headers)
        return self._reserver.reserve(headers)

    def can_reserve(self) -> bool:
        """Whether ``reserve`` hands out pages: a chunk it does not reserve is then stored
        already, being written, or finds no room."""
        return self._reserver is not None and all(
            t.write_policy != "write_through" for t in self.tiers[1:]
        )

    def commit(self, headers: Sequence[Any], ok: Sequence[bool]) -> list[bool]:
        """End a ``reserve``: publish the chunks whose ``ok`` is true (their payloads
        checked by the caller), free the rest; per chunk, whether it is stored."""
        tier = self.tiers[0]
        assert self._reserver is not None, "commit without reserve"
        stored = self._reserver.commit(headers, ok)
        done = [h for h, good in zip(headers, stored, strict=True) if good]
        self.metrics.bytes_written.labels(tier.name).inc(sum(h.nbytes for h in done))
        self._emit(tier, [h.key for h in done], False)
        return stored

    def give_back(self, keys: Sequence[str]) -> None:
        """End a ``borrow`` of ``keys`` (its hits): their pages may be reused again."""
        if keys:
            self.tiers[0].backend.unpin(keys)

    def _get_verified(
        self, tier: Tier, keys: list[str], outs: list[Any] | None
    ) -> list[Chunk | None]:
        return self._accept(tier, keys, tier.backend.get(keys, outs))

    def _fan_out(
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
        if self._io is None or not tier.backend.parallel_io or parts < 2 or small:
            # Reading small chunks costs Python time, not I/O: threads would only fight
            # for the GIL (measured: 64 KiB disk gets 0.78x of raw reads unsplit, 0.59x split).
            return fn(items, *extra)
        bounds = [len(items) * i // parts for i in range(parts + 1)]
        futures = [
            self._io.submit(fn, items[a:b], *(e[a:b] if e is not None else None for e in extra))
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        return [x for f in futures for x in f.result()]

    def _accept(self, tier: Tier, keys: list[str], got: list[Any]) -> list[Chunk | None]:
        """Verified chunks of one tier's answer; bad objects are counted and deleted."""
        out: list[Chunk | None] = []
        bad: list[str] = []  # failed verification here: to delete
        dropped: list[str] = []  # no longer in the tier (the backend dropped its own)
        fp = self.fingerprint
        for key, res in zip(keys, got, strict=True):
            if (
                type(res) is CheckedChunk
                and res[0].key == key
                and (fp is None or res[0].fingerprint == fp)
            ):
                out.append(res)  # hashed by its reader; ``verify``'s other checks, inlined
                continue
            if isinstance(res, Chunk) and tier.verify:
                try:
                    verify(res, key, self.fingerprint)
                except ChunkError as exc:
                    log.warning("%s tier: dropping chunk %s: %s", tier.name, key[:12], exc)
                    bad.append(key)
                    res = Corrupt(key, str(exc))
            if isinstance(res, Corrupt):
                self.metrics.checksum_failures.labels(tier.name).inc()
                dropped.append(key)
                res = None
            out.append(res)
        hits = [c for c in out if c is not None]
        self.metrics.hits.labels(tier.name).inc(len(hits))
        self.metrics.misses.labels(tier.name).inc(len(out) - len(hits))
        self.metrics.bytes_read.labels(tier.name).inc(sum(c.header.nbytes for c in hits))
        if bad:
            tier.backend.delete(bad)
        self._emit(tier, dropped, removed=True)
        return out

    def _promote(self, level: int, chunks: list[Chunk]) -> None:
        for tier in self.tiers[:level]:
            self._write(tier, chunks)

    # -- async ----------------------------------------------------------------------
    def get_async(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> Future:
        """``get`` on the executor at load priority; the future holds its result."""
        return self._executor.submit(Priority.LOAD, self.get, list(keys), outs)

    def get_layers_async(
        self, keys: Sequence[str], outs: Sequence[Any] | None, sink: LayerSink
    ) -> Future:
        """``get`` at load priority, delivering the chunks layer by layer: on the executor
        thread, ``sink(i, chunks)`` for i = 0, 1, ... as soon as layer i of every chunk
        found is verified. The future holds the chunks (``get``'s result).

        Why per layer: a caller waits for layer i only, not for the whole load (the
        engine runs layer 0's attention while later layers are still being copied in).
        Today every layer is ready at once after the whole-chunk read and checksum,
        since a chunk's checksum covers its whole payload and the tiers read whole
        objects; a chunk format with per-layer checksums and ranged tier reads could
        deliver layer 0 first without any change to callers.
        """
        return self._executor.submit(Priority.LOAD, self._get_layers, list(keys), outs, sink)

    def _get_layers(
        self, keys: list[str], outs: Sequence[Any] | None, sink: LayerSink
    ) -> list[Chunk | None]:
        chunks = self.get(keys, outs)
        layers = next((c.header.shape[0] for c in chunks if c is not None and c.header.shape), 0)
        for layer in range(layers):
            if sink(layer, chunks) is False:
                break
        return chunks

    def prefetch(self, keys: Sequence[str]) -> Future:
        """Promote the stored prefix of ``keys`` toward the fastest tier, ahead of a load."""
        return self._executor.submit(Priority.PREFETCH, self._prefetch, list(keys))

    def _prefetch(self, keys: list[str]) -> int:
        n = self.lookup(keys)
        if n and self.tiers[0].backend.contains(keys[:n]) < n:
            self.get(keys[:n])
        return n

    def put_async(self, chunks: Sequence[Chunk] | Callable[[], Sequence[Chunk]]) -> Future:
        """``put`` on the executor at save priority (after pending loads and prefetches);
        the future holds its ``PutResult``. ``chunks`` may be a function that builds them
        (a device-to-host copy, the checksums): it then runs on the executor too, off the
        caller's thread."""
        if callable(chunks):
            make = chunks
            return self._executor.submit(Priority.SAVE, lambda: self.put(list(make())))
        return self._executor.submit(Priority.SAVE, self.put, list(chunks))

    # -- the rest -------------------------------------------------------------------
    def delete(self, keys: Sequence[str]) -> int:
        """Remove keys from every tier; returns how many tier copies were removed."""
        n = 0
        for t in self.tiers:
            n += t.backend.delete(keys)
            self._emit(t, keys, removed=True)
        return n

    def pin(self, keys: Sequence[str]) -> None:
        """Keep ``keys`` from eviction in every tier until ``unpin``."""
        for t in self.tiers:
            t.backend.pin(keys)

    def unpin(self, keys: Sequence[str]) -> None:
        for t in self.tiers:
            t.backend.unpin(keys)

    def stats(self) -> dict[str, TierStats]:
        """Per-tier figures, fastest tier first."""
        return {t.name: self.metrics.snapshot(t.name) for t in self.tiers}

    def check_integrity(self) -> None:
        """Run every backend's own invariant check."""
        for t in self.tiers:
            if isinstance(t.backend, ChecksIntegrity):
                t.backend.check_integrity()

    def close(self) -> None:
        """Finish queued work, then close every tier."""
        self._executor.shutdown(wait=True)
        if self._io is not None:
            self._io.shutdown(wait=True)
        for t in self.tiers:
            t.backend.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timed(self, tier: Tier, op: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.metrics.latency.labels(tier.name, op).observe(time.perf_counter() - start)


def _nbytes(buf: Any) -> int:
    """Size of a caller's buffer (numpy array, tensor, memoryview), 0 for None."""
    if buf is None:
        return 0
    n = getattr(buf, "nbytes", None)
    return int(n) if n is not None else memoryview(buf).nbytes
