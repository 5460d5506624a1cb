"""Which instance holds which KV block, and in which medium, learnt from KV events.

``block hash -> {instance: {medium, ...}}``. A block can sit in several media of one
instance at once (the engine's cache and its store's CPU tier), and the prefix match uses
the best of them. Hashes are the one key's chained hashes (``kvcore/keys.py``), so a match
of block ``i`` implies the whole prefix up to ``i`` — the walk below still checks every
block, because blocks leave media one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kvcore.events import (
    MEDIUM_ENGINE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
)

TIER_WEIGHTS: dict[str, float] = {
    "GPU": 1.0,  # the engine's own paged cache: nothing to load
    "CPU": 0.8,
    "GDS": 0.6,
    "DISK": 0.5,
    "REMOTE": 0.4,
    "REDIS": 0.4,
}
UNKNOWN_TIER_WEIGHT = 0.5


class PrefixMatch(NamedTuple):
    """Leading blocks of a request an instance holds: tokens, and tokens weighted by tier."""

    hit_tokens: int
    weighted_tokens: float


class KVIndex:
    """The router's view of every instance's KV blocks."""

    def __init__(self, tier_weights: dict[str, float] | None = None) -> None:
        self.tier_weights = dict(TIER_WEIGHTS if tier_weights is None else tier_weights)
        self._where: dict[bytes | int, dict[str, set[str]]] = {}
        self._count: dict[str, int] = {}  # instance -> (block, medium) pairs held
        self.block_sizes: dict[str, int] = {}  # instance -> block size its events declare

    def apply(self, instance: str, events: Iterable[KVCacheEvent]) -> None:
        """Fold one instance's events, in order, into the index."""
        for ev in events:
            if isinstance(ev, BlockStored):
                self.block_sizes[instance] = ev.block_size
                for h in ev.block_hashes:
                    self._add(h, instance, ev.medium or MEDIUM_ENGINE)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    self._remove(h, instance, ev.medium or MEDIUM_ENGINE)
            elif isinstance(ev, AllBlocksCleared):
                self.clear(instance)

    def clear(self, instance: str) -> None:
        """Forget everything ``instance`` held (cleared cache, restarted publisher)."""
        for h in [h for h, owners in self._where.items() if instance in owners]:
            del self._where[h][instance]
            if not self._where[h]:
                del self._where[h]
        self._count.pop(instance, None)

    def num_blocks(self, instance: str) -> int:
        """(block, medium) pairs held by ``instance``."""
        return self._count.get(instance, 0)

    def match(
        self, hashes: Sequence[bytes], instances: Iterable[str], block_size: int
    ) -> dict[str, PrefixMatch]:
        """Longest run of leading ``hashes`` each instance holds, plain and tier-weighted."""
        out = {}
        for inst in instances:
            hit, weighted = 0, 0.0
            for h in hashes:
                media = self._where.get(h, {}).get(inst)
                if not media:
                    break
                hit += block_size
                weighted += block_size * max(map(self._weight, media))
            out[inst] = PrefixMatch(hit, weighted)
        return out

    def _weight(self, medium: str) -> float:
        return self.tier_weights.get(medium.upper(), UNKNOWN_TIER_WEIGHT)

    def _add(self, h: bytes | int, instance: str, medium: str) -> None:
        media = self._where.setdefault(h, {}).setdefault(instance, set())
        if medium not in media:
            media.add(medium)
            self._count[instance] = self._count.get(instance, 0) + 1

    def _remove(self, h: bytes | int, instance: str, medium: str) -> None:
        owners = self._where.get(h)
        media = owners.get(instance) if owners else None
        if not media or medium not in media:
            return
        media.discard(medium)
        self._count[instance] -= 1
        if not media:
            del owners[instance]
            if not owners:
                del self._where[h]
