"""The get path: ask the tiers in order, accept only verified chunks, promote hits.

Kept apart from the facade because it is the hot path and the one place that judges
what a tier returns: a tier may miss, it never hands the caller wrong KV. Each tier is
asked once per get for the keys still missing (a batch, split across the I/O threads
when large); what comes back is checked here (key, fingerprint, and the payload's xxh3
where the tier's ``verify`` is on and its reader did not already hash it), and the
hits of a lower tier are written into every tier above.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from backends.base import Corrupt
from kvcore.chunk import CheckedChunk, Chunk, ChunkError, verify
from store.metrics import StoreMetrics
from store.tier_io import SPLIT_MIN_CHUNK, Emit, Tier, TierIO

log = logging.getLogger("store.tiered")  # the store's logger, so filters on it still apply


class TierGetter:
    """``TieredStore.get`` over ``tiers`` (fastest first) for chunks of ``fingerprint``."""

    def __init__(
        self,
        tiers: list[Tier],
        fingerprint: bytes | None,
        metrics: StoreMetrics,
        tier_io: TierIO,
        emit: Emit,
    ) -> None:
        self.tiers = tiers
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.tier_io = tier_io
        self.emit = emit

    def get(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> list[Chunk | None]:
        """Each key's chunk (into ``outs[i]`` when given) or ``None``; hits found in lower
        tiers are promoted into every tier above."""
        results: list[Chunk | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        tier_io = self.tier_io
        for level, tier in enumerate(self.tiers):
            if not todo:
                break
            tier_keys = [keys[i] for i in todo]
            tier_outs = [outs[i] for i in todo] if outs is not None else None
            nbytes = sum(_nbytes(o) for o in tier_outs) if tier_outs is not None else 0
            fetch = functools.partial(self._get_verified, tier)
            found = tier_io.timed(
                tier,
                "get",
                tier_io.fan_out,
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

    def _get_verified(
        self, tier: Tier, keys: list[str], outs: list[Any] | None
    ) -> list[Chunk | None]:
        return self.accept(tier, keys, tier.backend.get(keys, outs))

    def accept(self, tier: Tier, keys: list[str], got: list[Any]) -> list[Chunk | None]:
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
        self.emit(tier, dropped, True)
        return out

    def _promote(self, level: int, chunks: list[Chunk]) -> None:
        for tier in self.tiers[:level]:
            self.tier_io.write(tier, chunks)


def _nbytes(buf: Any) -> int:
    """Size of a caller's buffer (numpy array, tensor, memoryview), 0 for None."""
    if buf is None:
        return 0
    n = getattr(buf, "nbytes", None)
    return int(n) if n is not None else memoryview(buf).nbytes
