"""Replay a Mooncake trace through a TieredStore to measure prefix hit ratios.

The trace lists, per request, ``hash_ids``: one id per 512-token block, equal leading ids
meaning a shared prefix. Each id gets synthetic tokens (id ``h`` -> the 512 tokens
``h*512 .. h*512+511``), hashed with the one key module, one chunk per block. Payloads
are tiny (the hit ratio depends on counts, not bytes): a cpu tier of ``capacity`` pages
of 64 bytes holds ``capacity`` blocks, which makes the figures comparable with the
trace README's plain-LRU figures at the same capacities.

Per request, in arrival order: ``lookup`` (hit tokens = matched blocks x 512, capped at
the input length), ``get`` of the matched chunks (a hit touches them, as a load would),
then ``put`` of the rest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from kvcore.keys import BlockHash, ModelFingerprint, chunk_key, hash_block
from store.config import from_flat
from store.tiered import TieredStore

TRACE_BLOCK = 512
PAYLOAD = 64  # bytes per synthetic chunk (one page)
FINGERPRINT = ModelFingerprint("trace-replay", "none", "uint8", 1, 1, PAYLOAD)


class Request(NamedTuple):
    input_length: int
    hash_ids: list[int]


class ReplayResult(NamedTuple):
    """Fraction of input tokens served from the store."""

    policy: str
    capacity: int
    hit_ratio: float
    requests: int


def read_trace(path: str, limit: int | None = None) -> list[Request]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.append(Request(int(rec["input_length"]), list(rec["hash_ids"])))
                if limit is not None and len(out) >= limit:
                    break
    return out


class _Keys:
    """Chunk keys of trace blocks, chained with the one key module and memoised."""

    def __init__(self) -> None:
        self._hashes: dict[tuple[BlockHash | None, int], BlockHash] = {}
        self._fp = FINGERPRINT.digest()

    def of(self, hash_ids: list[int]) -> Iterator[str]:
        parent: BlockHash | None = None
        for hid in hash_ids:
            h = self._hashes.get((parent, hid))
            if h is None:
                base = hid * TRACE_BLOCK
                h = self._hashes[(parent, hid)] = hash_block(
                    parent, range(base, base + TRACE_BLOCK)
                )
            parent = h
            yield chunk_key(self._fp, h)


def replay(requests: list[Request], capacity: int, policy: str) -> ReplayResult:
    """Hit ratio of a one-tier (cpu) store holding ``capacity`` blocks under ``policy``."""
    config = from_flat(
        {
            "tiers": ["cpu"],
            "cpu.size": capacity * PAYLOAD,
            "cpu.page_size": PAYLOAD,
            "cpu.policy": policy,
            "workers": 1,
        }
    )
    keys_of = _Keys()
    payload = np.zeros(PAYLOAD, dtype=np.uint8)
    hit = total = 0
    with TieredStore(config, FINGERPRINT) as store:
        for req in requests:
            keys = list(keys_of.of(req.hash_ids))
            n = store.lookup(keys)
            hit += min(n * TRACE_BLOCK, req.input_length)
            total += req.input_length
            if n:
                store.get(keys[:n])
            store.put([store.make_chunk(k, payload, TRACE_BLOCK) for k in keys[n:]])
    return ReplayResult(policy, capacity, hit / max(total, 1), len(requests))
