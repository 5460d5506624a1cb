"""Decode KV event batches from the wire (``engine/kv_publisher.py`` and vLLM alike).

vLLM has sent two encodings of ``KVEventBatch``: ``array_like`` structs (a batch
``[ts, [events], dp_rank]``, an event ``["BlockStored", hashes, parent, ...]``) and, in
later versions, maps (``{"ts", "events", "data_parallel_rank"}``, an event with its tag
under ``"type"``). Both decode to ``kvcore.events`` types; unknown event tags are
skipped (a newer engine must not break an older router).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from kvcore.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
)
_REMOVED_FIELDS = ("block_hashes", "medium")


class EventBatch(NamedTuple):
    ts: float
    events: list[KVCacheEvent]
    dp_rank: int | None


class BadEventBatch(ValueError):
    """A payload that is not a KV event batch."""


def decode_batch(payload: bytes) -> EventBatch:
    """Events of one msgpack ``KVEventBatch`` payload."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise BadEventBatch(f"not msgpack: {e}") from None
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    else:
        raise BadEventBatch(f"not a batch: {type(raw).__name__}")
    if not isinstance(events, list):
        raise BadEventBatch("batch events are not a list")
    decoded = [ev for ev in map(decode_event, events) if ev is not None]
    return EventBatch(float(ts or 0.0), decoded, rank)


def decode_event(raw: Any) -> KVCacheEvent | None:
    """One tagged event, or None for a tag this router does not know."""
    if isinstance(raw, list) and raw:
        tag, values = raw[0], raw[1:]
        fields = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS
        named = dict(zip(fields, values, strict=False))
    elif isinstance(raw, dict):
        tag, named = raw.get("type"), raw
    else:
        raise BadEventBatch(f"not an event: {raw!r:.80}")
    if tag == "BlockStored":
        return BlockStored(
            list(named["block_hashes"]),
            named.get("parent_block_hash"),
            list(named.get("token_ids") or []),
            int(named["block_size"]),
            named.get("lora_id"),
            named.get("medium"),
            named.get("lora_name"),
            named.get("extra_keys"),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(list(named["block_hashes"]), named.get("medium"))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return None
