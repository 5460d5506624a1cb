"""``kvstore bench``: tier throughput next to physical baselines measured in the same run.

Each tier runs as a one-tier TieredStore, so the figures include what a user pays:
metrics, verification on reads where the tier verifies (disk, redis: xxh3 of every
payload), and for redis the chunk header. Chunks are built (and their checksum taken)
before timing: that happens once per chunk when the engine saves it, whatever the tiers.

Baselines move the same payload bytes with no store in between:

* cpu:   ``numpy.copyto`` into preallocated buffers (memcpy)
* disk:  open + write + fsync + close per file; open + readinto + close
* redis: redis-py pipelined SET / GET of the payload bytes, in batches of the same size
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from kvcore.chunk import make_chunk
from store.config import StoreConfig
from store.tiered import TieredStore

BENCH_BYTES = 256 * 2**20  # payload bytes moved per measurement
REPEATS = 5
GETS_PER_PUT = 3  # gets are cheap next to fsynced puts: more samples, same for both sides
MAX_CHUNKS = 1024  # caps small-chunk runs (64 KiB x fsync is slow and says nothing new)


class Throughput(NamedTuple):
    """GB/s (10^9 bytes per second) of one tier and chunk size, and of its baseline."""

    tier: str
    size: int
    put: float
    get: float
    base_put: float
    base_get: float


class Ops(NamedTuple):
    """One side of a measurement: ``reset`` (untimed) empties, ``put`` fills, ``get`` reads."""

    reset: Callable[[], Any]
    put: Callable[[], Any]
    get: Callable[[], Any]
    close: Callable[[], Any]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _payloads(size: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(size)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]


def bench_tier(tier: str, size: int, config: StoreConfig, total: int = BENCH_BYTES) -> Throughput:
    """Put and get ``total`` bytes in chunks of ``size`` through ``tier`` and its baseline.

    Store and baseline runs alternate, best of REPEATS puts and REPEATS x GETS_PER_PUT
    gets each, so background load on the machine hits both sides alike. Each side reads
    right after its own write, and the side that goes first swaps every repeat: pages
    written longer ago may have been reclaimed (proactive reclaim, e.g. DAMON), and a
    get that waited for the other side's write would read them from the device while
    the other read the page cache.
    """
    count = max(4, min(total // size, MAX_CHUNKS))
    data = _payloads(size, count)
    outs = [np.empty(size, dtype=np.uint8) for _ in range(count)]
    ours = _store_ops(tier, size, config, data, outs)
    base = BASELINES[tier](config, data, outs)
    best = [float("inf")] * 4
    try:
        for repeat in range(REPEATS):
            for i in (0, 1) if repeat % 2 == 0 else (1, 0):
                side = (ours, base)[i]
                side.reset()
                best[i] = min(best[i], _timed(side.put))
                for _ in range(GETS_PER_PUT):
                    best[2 + i] = min(best[2 + i], _timed(side.get))
        if not all(np.array_equal(o, d) for o, d in zip(outs, data, strict=True)):
            raise RuntimeError(f"{tier} benchmark read back wrong data")
        ours.get()  # the store side last: its bytes must be what was put
        if not all(np.array_equal(o, d) for o, d in zip(outs, data, strict=True)):
            raise RuntimeError(f"{tier} tier returned wrong or missing data in the benchmark")
    finally:
        ours.close()
        base.close()
    rate = [size * count / t / 1e9 for t in best]
    return Throughput(tier, size, rate[0], rate[2], rate[1], rate[3])


def _store_ops(
    tier: str, size: int, config: StoreConfig, data: list[np.ndarray], outs: list[np.ndarray]
) -> Ops:
    chunks = [
        make_chunk(f"{tier}-{size}-{i:08d}".ljust(64, "0"), b"\0" * 32, d, 1)
        for i, d in enumerate(data)
    ]
    keys = [c.header.key for c in chunks]
    store = TieredStore(config)
    backend = store.tiers[0].backend

    def get() -> None:
        if any(g is None for g in store.get(keys, outs)):
            raise RuntimeError(f"{tier} tier lost chunks during the benchmark")

    def close() -> None:
        backend.delete(keys)
        store.close()

    return Ops(lambda: backend.delete(keys), lambda: store.put(chunks), get, close)


def _memcpy_baseline(config: StoreConfig, data: list[np.ndarray], outs: list[np.ndarray]) -> Ops:
    dst = [np.empty_like(d) for d in data]

    def copy_in() -> None:
        for s, d in zip(data, dst, strict=True):
            np.copyto(d, s)

    def copy_out() -> None:
        for s, d in zip(dst, outs, strict=True):
            np.copyto(d, s)

    return Ops(lambda: None, copy_in, copy_out, lambda: None)


def _file_baseline(config: StoreConfig, data: list[np.ndarray], outs: list[np.ndarray]) -> Ops:
    folder = tempfile.mkdtemp(prefix="raw-", dir=config.disk.path)
    paths = [os.path.join(folder, f"{i}.bin") for i in range(len(data))]

    def write() -> None:
        for p, d in zip(paths, data, strict=True):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, d)
            if config.disk.fsync:
                os.fsync(fd)
            os.close(fd)

    def read() -> None:
        for p, o in zip(paths, outs, strict=True):
            with open(p, "rb", buffering=0) as f:
                if f.readinto(o) != o.nbytes:  # a cheap check that every read happened
                    raise RuntimeError(f"raw file baseline: short read of {p}")

    def reset() -> None:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)

    return Ops(reset, write, read, lambda: shutil.rmtree(folder, ignore_errors=True))


def _redis_baseline(config: StoreConfig, data: list[np.ndarray], outs: list[np.ndarray]) -> Ops:
    import redis

    from backends.redis import parse_url

    client = redis.Redis.from_url(
        parse_url(config.redis.url)[0], socket_timeout=config.redis.timeout
    )
    keys = [f"rawbench:{i}" for i in range(len(data))]
    batch = config.redis.batch_size

    def run(op: Callable[[Any, int], Any]) -> None:
        for i in range(0, len(keys), batch):
            pipe = client.pipeline(transaction=False)
            for j in range(i, min(i + batch, len(keys))):
                op(pipe, j)
            if any(r is None for r in pipe.execute()):  # a cheap check that every GET hit
                raise RuntimeError("raw redis baseline: a key is missing")

    def close() -> None:
        client.delete(*keys)
        client.close()

    return Ops(
        lambda: client.delete(*keys),
        lambda: run(lambda p, j: p.set(keys[j], memoryview(data[j]))),
        lambda: run(lambda p, j: p.get(keys[j])),
        close,
    )


BASELINES: dict[str, Callable[..., Ops]] = {
    "cpu": _memcpy_baseline,
    "disk": _file_baseline,
    "redis": _redis_baseline,
}


def bench_config(tier: str, size: int, base: StoreConfig, total: int = BENCH_BYTES) -> StoreConfig:
    """``base`` reduced to one tier, big enough to hold a whole measurement."""
    from store.config import from_flat

    room = 2 * max(total, 4 * size)
    flat: dict[str, Any] = {"tiers": [tier], "workers": 1, "io_threads": base.io_threads}
    if tier != "redis":
        flat[f"{tier}.size"] = room
    keep = {
        "cpu": ("page_size", "verify"),
        "disk": ("path", "fsync", "o_direct", "verify"),
        "redis": ("url", "namespace", "verify", "batch_size", "timeout", "connect_timeout"),
    }[tier]
    for key in keep:
        flat[f"{tier}.{key}"] = getattr(base.tier(tier), key)
    return from_flat(flat)
