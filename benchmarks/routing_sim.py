"""The Mooncake conversation trace through the router's policies and simulated engine caches.

SIMULATION: no engine runs. Each instance is a prefix cache of ``capacity`` blocks with
LRU eviction (a request touches its blocks tail first, so a chain loses its tail before
its head, as an engine frees blocks). The caches emit ``BlockStored`` / ``BlockRemoved``
that go through the real wire codec (``engine/kv_publisher.encode_batch`` ->
``router/kv_events.decode_batch``) into the router's real ``KVIndex``, and the router's
real policy objects choose. Load is simulated from the trace's arrival times: each
instance prefills one request at a time (``prefill_ms_per_token`` per uncached token) and
decodes for ``tpot_ms`` per output token; a request counts as in flight until it ends.
"""

from __future__ import annotations

import heapq
import json
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from harness import percentile

from engine.kv_publisher import encode_batch
from kvcore.events import BlockRemoved, BlockStored
from kvcore.keys import block_hashes
from router.backends import Backend
from router.kv_events import decode_batch
from router.kv_index import KVIndex
from router.policies import make_policy

TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the trace


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    token_ids: list[int]
    output_tokens: int
    hashes: list[bytes]  # of the full blocks, by the one key module


def load_trace(
    path: Path, tokens_per_hash: int, block_size: int, limit: int | None = None, vocab: int = 32000
) -> list[TraceRequest]:
    """Requests with token ids synthesised per hash id (same id -> same tokens), input and
    output lengths scaled by ``tokens_per_hash / 512``."""
    scale = tokens_per_hash / TRACE_BLOCK_TOKENS
    cache: dict[int, list[int]] = {}
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            ids = [
                t for h in row["hash_ids"] for t in _hash_tokens(h, tokens_per_hash, vocab, cache)
            ]
            n = max(1, min(len(ids), round(row["input_length"] * scale)))
            out_len = max(1, round(row["output_length"] * scale))
            ids = ids[:n]
            out.append(
                TraceRequest(row["timestamp"] / 1000.0, ids, out_len, block_hashes(ids, block_size))
            )
    return out


def _hash_tokens(h: int, n: int, vocab: int, cache: dict[int, list[int]]) -> list[int]:
    if h not in cache:
        rng = random.Random(h)
        cache[h] = [rng.randrange(3, vocab) for _ in range(n)]  # ids 0-2 are specials
    return cache[h]


class LRUPrefixCache:
    """One instance's prefix cache: ``capacity`` blocks, least recently used evicted first."""

    def __init__(self, capacity: int, block_size: int) -> None:
        self.capacity, self.block_size = capacity, block_size
        self.blocks: OrderedDict[bytes, None] = OrderedDict()

    def lookup(self, hashes: list[bytes]) -> int:
        """Leading blocks held."""
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def admit(self, hashes: list[bytes], token_ids: list[int]) -> list:
        """Hold every block of a request (tail touched first); the events that caused."""
        bs, events, new = self.block_size, [], []
        for i in reversed(range(len(hashes))):
            h = hashes[i]
            if h in self.blocks:
                self.blocks.move_to_end(h)
            else:
                self.blocks[h] = None
                new.append(i)
        for i in sorted(new):
            parent = hashes[i - 1] if i else None
            events.append(BlockStored([hashes[i]], parent, token_ids[i * bs : (i + 1) * bs], bs))
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[0])
        if evicted:
            events.append(BlockRemoved(evicted))
        return events


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    hit_ratio: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    per_instance_requests: list[int]


def simulate(
    reqs: list[TraceRequest],
    policy: str,
    instances: int,
    capacity: int,
    block_size: int,
    prefill_ms_per_token: float = 0.5,
    tpot_ms: float = 20.0,
    **policy_kw,
) -> SimResult:
    index = KVIndex()
    backends = [Backend(f"sim://{i}") for i in range(instances)]
    caches = [LRUPrefixCache(capacity, block_size) for _ in backends]
    pol = make_policy(policy, index, block_size, **policy_kw)
    busy_until = [0.0] * instances
    ends: list[tuple[float, int]] = []  # (end time, instance) of requests in flight
    hit = total = 0
    ttfts, counts = [], [0] * instances
    for r in reqs:
        while ends and ends[0][0] <= r.arrival_s:
            backends[heapq.heappop(ends)[1]].in_flight -= 1
        hashes = r.hashes
        k = backends.index(pol.choose(backends, hashes).backend)
        cached = caches[k].lookup(hashes) * block_size
        hit, total = hit + cached, total + len(r.token_ids)
        batch = encode_batch(caches[k].admit(hashes, r.token_ids), r.arrival_s)
        index.apply(backends[k].url, decode_batch(batch).events)
        start = max(r.arrival_s, busy_until[k])
        busy_until[k] = start + (len(r.token_ids) - cached) * prefill_ms_per_token / 1000
        ttfts.append(busy_until[k] - r.arrival_s)
        heapq.heappush(ends, (busy_until[k] + r.output_tokens * tpot_ms / 1000, k))
        backends[k].in_flight += 1
        counts[k] += 1
    p50, p90, p99 = (percentile(ttfts, q) for q in (50, 90, 99))
    return SimResult(policy, hit / max(total, 1), p50, p90, p99, counts)


def single_engine_hit_ratio(reqs: list[TraceRequest], capacity: int, block_size: int) -> float:
    """Hit ratio of one engine holding every instance's cache (``capacity`` blocks)."""
    cache = LRUPrefixCache(capacity, block_size)
    hit = total = 0
    for r in reqs:
        hashes = r.hashes
        hit += cache.lookup(hashes) * block_size
        total += len(r.token_ids)
        cache.admit(hashes, r.token_ids)
    return hit / max(total, 1)
