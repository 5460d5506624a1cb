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

This module is the facade: construction, put, lookup, demotion, events, the executor.
The rest is built once here and delegated to, each in a module named for its job:
store/tier_io.py (calls into one tier: timed, split across I/O threads, counted),
store/tier_get.py (the get path: verification, promotion), store/lending.py (the first
tier's pages lent and reserved, for the daemon), store/layers.py (per-layer delivery).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry

from backends.base import Backend
from backends.capabilities import ChecksIntegrity
from kvcore.chunk import Chunk, make_chunk
from kvcore.keys import ModelFingerprint
from store.build import build_tiers
from store.config import StoreConfig
from store.executor import Priority, PriorityExecutor
from store.layers import LayerSink, get_layers
from store.lending import Lending
from store.metrics import StoreMetrics, TierStats
from store.tier_get import TierGetter
from store.tier_io import SPLIT_BYTES, SPLIT_MIN_CHUNK, Tier, TierIO

__all__ = [
    "SPLIT_BYTES",
    "SPLIT_MIN_CHUNK",
    "ChunkEvent",
    "ChunkListener",
    "LayerSink",
    "PutResult",
    "Tier",
    "TieredStore",
]

log = logging.getLogger(__name__)


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
        self._executor = PriorityExecutor(config.workers, save_nice=config.save_nice)
        self._tier_io = TierIO(config, self.metrics, self._emit)
        self._getter = TierGetter(self.tiers, fingerprint, self.metrics, self._tier_io, self._emit)
        # What the first tier can do beyond Backend (backends/capabilities.py) is asked
        # once, in Lending: an isinstance of a protocol costs microseconds.
        self._lending = Lending(self.tiers, self.metrics, self._emit)
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
            self._tier_io.write(lower, [chunk])
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
        timed = self._tier_io.timed
        located = list(found)
        while len(located) < len(keys):
            before = len(located)
            for tier in tiers:
                n = timed(tier, "contains", tier.backend.contains, keys[len(located) :])
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
        write = self._tier_io.write
        for i, tier in enumerate(self.tiers):
            if i == 0 or tier.write_policy == "write_through":
                todo = list(range(len(chunks)))
            else:  # write_back: only what no tier above could take (too big, all pinned)
                todo = [j for j, ok in enumerate(stored) if not ok]
            col = by_tier[tier.name] = [False] * len(chunks)
            for j, ok in zip(todo, write(tier, [chunks[j] for j in todo]), strict=True):
                col[j] = ok
                stored[j] = stored[j] or ok
        return PutResult(stored, by_tier)

    # -- get (store/tier_get.py) ----------------------------------------------------
    def get(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> list[Chunk | None]:
        """Each key's chunk (into ``outs[i]`` when given) or ``None``; hits found in lower
        tiers are promoted into every tier above."""
        return self._getter.get(keys, outs)

    # -- the first tier's pages, for the daemon (store/lending.py) --------------------
    def borrow(self, keys: Sequence[str]) -> list[tuple[Any, list[Any]] | None]:
        """Hits in the first tier, when it can lend them (a host ``cpu`` tier that does
        not verify reads): (header, read-only views of its pages), pinned until
        ``give_back`` of those keys. Everything else is None: ``get`` it."""
        return self._lending.lend_first("borrow", keys)

    def lend(self, keys: Sequence[str]) -> list[tuple[Any, list[Any]] | None]:
        """``borrow``, with (header, runs of the first tier's pool) for each hit: for a
        reader that maps that pool itself (``shared_pool``)."""
        return self._lending.lend_first("lend", keys)

    def shared_pool(self) -> Any:
        """The first tier's SharedBuffer when its pool is in shared memory and it lends
        hits (so same-host clients may read them in place), else None."""
        return self._lending.shared_pool()

    def reserve(self, headers: Sequence[Any]) -> list[list[Any] | None]:
        """Writable page views in the first tier for each new chunk, when the store can
        take chunks that way (its first tier reserves and no lower tier is written
        through); fill them, then ``commit``. None for a chunk: ``put`` it instead."""
        return self._lending.reserve(headers)

    def can_reserve(self) -> bool:
        """Whether ``reserve`` hands out pages: a chunk it does not reserve is then stored
        already, being written, or finds no room."""
        return self._lending.can_reserve()

    def commit(self, headers: Sequence[Any], ok: Sequence[bool]) -> list[bool]:
        """End a ``reserve``: publish the chunks whose ``ok`` is true (their payloads
        checked by the caller), free the rest; per chunk, whether it is stored."""
        return self._lending.commit(headers, ok)

    def give_back(self, keys: Sequence[str]) -> None:
        """End a ``borrow`` of ``keys`` (its hits): their pages may be reused again."""
        self._lending.give_back(keys)

    # -- async ----------------------------------------------------------------------
    def get_async(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> Future:
        """``get`` on the executor at load priority; the future holds its result."""
        return self._executor.submit(Priority.LOAD, self.get, list(keys), outs)

    def get_layers_async(
        self, keys: Sequence[str], outs: Sequence[Any] | None, sink: LayerSink
    ) -> Future:
        """``get`` at load priority, delivering the chunks layer by layer: on the executor
        thread, ``sink(i, chunks)`` for i = 0, 1, ... as soon as layer i of every chunk
        found is verified. The future holds the chunks (``get``'s result). Why, and what
        "as soon as" means today: store/layers.py."""
        return self._executor.submit(Priority.LOAD, self._get_layers, list(keys), outs, sink)

    def _get_layers(
        self, keys: list[str], outs: Sequence[Any] | None, sink: LayerSink
    ) -> list[Chunk | None]:
        return get_layers(self.get, keys, outs, sink)

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
        self._tier_io.close()
        for t in self.tiers:
            t.backend.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
