"""Which tiers hold each chunk the connector knows, and the KV events that follow.

The store names chunks by key and knows nothing of blocks or tokens; a router needs
``BlockStored`` / ``BlockRemoved`` with block hashes (and token ids). So the connector
describes each chunk it saves or loads (``describe``) while the request is at hand, and
turns the store's ``ChunkEvent`` (a tier stored / no longer holds keys) into KV events
with the tier as ``medium``: the scheme of vLLM's ``OffloadingEventsTracker``
(``vllm/distributed/kv_transfer/kv_connector/v1/offloading/events.py``).

Residency per chunk is a set of tiers. An event that changes nothing (a put of a chunk
the tier already holds, a delete of a key the tier never had) yields no KV event, so a
router sees one ``BlockStored`` per tier per chunk, then at most one ``BlockRemoved``.
A description is dropped when its chunk leaves its last tier, or when a save stored it
nowhere. Chunks other processes wrote (a shared disk or Redis) are announced only once
this process sees them move (a load promotes them into a tier above).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kvcore.events import BlockRemoved, BlockStored, KVCacheEvent, coalesce, tier_medium
from kvcore.keys import BlockHash
from store.tiered import ChunkEvent


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """What the KV events of one chunk say: its blocks, their parent, its tokens."""

    block_hashes: list[BlockHash]
    parent: BlockHash | None
    token_ids: list[int]


class ChunkResidency:
    """Chunk key -> (description, tiers holding it). Thread-safe: store events arrive on
    the store's threads (under a tier's lock, so nothing here calls the store)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._lock = threading.Lock()
        self._info: dict[str, ChunkInfo] = {}
        self._tiers: dict[str, set[str]] = {}
        self._events: list[KVCacheEvent] = []

    def describe(self, key: str, info: ChunkInfo) -> None:
        """Remember what ``key``'s events say (before a save or load of it starts)."""
        with self._lock:
            self._info[key] = info
            self._tiers.setdefault(key, set())

    def on_store_event(self, event: ChunkEvent) -> None:
        """A store listener: residency changes of described chunks become KV events."""
        medium = tier_medium(event.tier)
        with self._lock:
            for key in event.keys:
                info, tiers = self._info.get(key), self._tiers.get(key)
                if info is None or tiers is None or (event.tier in tiers) != event.removed:
                    continue  # unknown chunk, or nothing changed
                if event.removed:
                    tiers.discard(event.tier)
                    self._events.append(BlockRemoved(list(info.block_hashes), medium))
                    if not tiers:
                        self._forget(key)
                else:
                    tiers.add(event.tier)
                    self._events.append(
                        BlockStored(
                            list(info.block_hashes),
                            info.parent,
                            list(info.token_ids),
                            self.block_size,
                            medium=medium,
                        )
                    )

    def forget_unstored(self, keys: Sequence[str]) -> None:
        """Drop descriptions of ``keys`` that no tier holds (a save that stored nothing)."""
        with self._lock:
            for key in keys:
                if not self._tiers.get(key, True):
                    self._forget(key)

    def tiers_of(self, key: str) -> set[str]:
        """The tiers known to hold ``key`` (empty when unknown)."""
        with self._lock:
            return set(self._tiers.get(key, ()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._info)

    def take_events(self) -> list[KVCacheEvent]:
        """The KV events since the last call, runs merged."""
        with self._lock:
            events, self._events = self._events, []
        return coalesce(events)

    def _forget(self, key: str) -> None:
        self._info.pop(key, None)
        self._tiers.pop(key, None)
