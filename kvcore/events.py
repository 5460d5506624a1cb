"""KV events in vLLM's shape (``vllm/distributed/kv_events.py``), for a KV-aware router.

Field names and order follow vLLM's ``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared`` so that a router can decode events from vLLM and from this engine
alike (msgpack over ZMQ comes with the router). Block hashes are this project's chained
sha256-CBOR hashes (``kvcore/keys.py``), the scheme vLLM uses with ``sha256_cbor``.

``medium`` says where the blocks are: ``GPU`` is the engine's own paged cache (vLLM's
name for it, whatever the device), the store's tiers are their names upper-cased
(``CPU``, ``DISK``, ``GDS``, ``REDIS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvcore.keys import BlockHash

MEDIUM_ENGINE = "GPU"


def tier_medium(tier: str) -> str:
    """The ``medium`` of a store tier named ``tier``."""
    return tier.upper()


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A run of chained full blocks became resident in ``medium``."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None  # hash of the block before the first; None at the start
    token_ids: list[int]  # all tokens of the run, block after block
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_ENGINE
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left ``medium``."""

    block_hashes: list[BlockHash]
    medium: str | None = MEDIUM_ENGINE


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every block of the engine's cache was dropped (vLLM's event has no fields)."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


def coalesce(events: list[KVCacheEvent]) -> list[KVCacheEvent]:
    """Merge runs: a ``BlockStored`` that continues the chain of the one before it (same
    medium and block size, its parent the last block before), and consecutive
    ``BlockRemoved`` of one medium. Order is kept otherwise."""
    out: list[KVCacheEvent] = []
    for ev in events:
        prev = out[-1] if out else None
        if (
            isinstance(ev, BlockStored)
            and isinstance(prev, BlockStored)
            and prev.medium == ev.medium
            and prev.block_size == ev.block_size
            and ev.parent_block_hash == prev.block_hashes[-1]
        ):
            out[-1] = BlockStored(
                prev.block_hashes + ev.block_hashes,
                prev.parent_block_hash,
                prev.token_ids + ev.token_ids,
                prev.block_size,
                medium=prev.medium,
            )
        elif (
            isinstance(ev, BlockRemoved)
            and isinstance(prev, BlockRemoved)
            and prev.medium == ev.medium
        ):
            out[-1] = BlockRemoved(prev.block_hashes + ev.block_hashes, prev.medium)
        else:
            out.append(ev)
    return out


def engine_events(
    raw: list[tuple[str, BlockHash]], cached: dict, block_size: int
) -> list[KVCacheEvent]:
    """Typed events from the block pool's ``(kind, hash)`` records.

    ``cached`` is the pool's hash map (hash -> block with ``token_ids`` and
    ``parent_hash``); call this at the end of each step, while blocks stored during the
    step are certainly still cached. Runs of one kind are merged into one event.
    """
    out: list[KVCacheEvent] = []
    for kind, h in raw:
        if kind == "stored":
            block = cached.get(h)
            if block is not None and block.token_ids is not None:
                out.append(BlockStored([h], block.parent_hash, list(block.token_ids), block_size))
        elif kind == "removed":
            out.append(BlockRemoved([h]))
        elif kind == "cleared":
            out.append(AllBlocksCleared())
    return coalesce(out)
