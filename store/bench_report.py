"""Run the benchmark tables of ``kvstore bench`` and print them."""

from __future__ import annotations

import logging
import platform
from typing import Any

from store.bench import Throughput, bench_config, bench_tier
from store.config import StoreConfig

log = logging.getLogger(__name__)
BASELINE_NAMES = {
    "cpu": "memcpy",
    "disk": "file write+fsync / read",
    "redis": "redis-py pipelined SET/GET",
}
TARGETS = {"cpu": 0.7, "disk": 0.8, "redis": 0.8}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def _redis_reachable(config: StoreConfig) -> bool:
    from backends.redis import RedisBackend

    backend = RedisBackend(config.redis.url, connect_timeout=1.0, timeout=2.0)
    try:
        return backend.contains(["reachability-probe"]) == 0 and backend._down_until == 0.0
    finally:
        backend.close()


def throughput_table(
    config: StoreConfig, tiers: list[str], sizes: list[int], total: int
) -> list[Throughput]:
    rows: list[Throughput] = []
    print(
        f"{'tier':6} {'size':>6} | {'put GB/s':>8} {'base':>7} {'ratio':>5} | {'get GB/s':>8} {'base':>7} {'ratio':>5} | baseline"
    )
    for tier in tiers:
        if tier == "redis" and not _redis_reachable(config):
            print(f"{tier:6} skipped: {config.redis.url} unreachable (set redis.url)")
            continue
        for size in sizes:
            r = bench_tier(tier, size, bench_config(tier, size, config, total), total)
            rows.append(r)
            print(
                f"{tier:6} {_size(size):>6} | {r.put:8.2f} {r.base_put:7.2f} {r.put / r.base_put:5.2f} | "
                f"{r.get:8.2f} {r.base_get:7.2f} {r.get / r.base_get:5.2f} | {BASELINE_NAMES[tier]}",
                flush=True,
            )
    return rows


REFERENCE_LRU = {1000: 0.045, 5000: 0.113, 20000: 0.293, 100000: 0.371}
"""Plain prefix-chain LRU hit ratios from the trace's README (the shared conversation trace), by capacity in blocks."""


def replay_table(trace: str, capacities: list[int], limit: int | None) -> list[dict[str, Any]]:
    from store.replay import read_trace, replay

    requests = read_trace(trace, limit)
    print(
        f"\ntrace replay: {len(requests)} requests of {trace}; hit ratio = cached input tokens / input tokens"
    )
    print(f"{'capacity':>9} | {'README LRU':>10} {'store lru':>9} {'store s3fifo':>12} {'gain':>6}")
    rows = []
    for cap in capacities:
        lru = replay(requests, cap, "lru").hit_ratio
        s3 = replay(requests, cap, "s3fifo").hit_ratio
        ref = REFERENCE_LRU.get(cap) if limit is None else None
        ref_s = f"{ref:10.3f}" if ref is not None else f"{'-':>10}"
        print(
            f"{cap:>9} | {ref_s} {lru:9.3f} {s3:12.3f} {s3 / lru - 1 if lru else 0:+6.0%}",
            flush=True,
        )
        rows.append({"capacity_blocks": cap, "readme_lru": ref, "lru": lru, "s3fifo": s3})
    return rows


def run_bench(
    config: StoreConfig,
    tiers: list[str],
    sizes: list[int],
    total: int,
    trace: str | None,
    capacities: list[int],
    limit: int | None,
) -> dict[str, Any]:
    """Print both tables; return them as a JSON-ready dict."""
    rows = throughput_table(config, tiers, sizes, total)
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
        },
        "unit": "GB/s (1e9 bytes/s)",
        "targets": TARGETS,
        "throughput": [
            r._asdict() | {"put_ratio": r.put / r.base_put, "get_ratio": r.get / r.base_get}
            for r in rows
        ],
    }
    if trace is not None:
        report["replay"] = replay_table(trace, capacities, limit)
    return report
