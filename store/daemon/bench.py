"""``kvstore bench --url``: daemon put/get GB/s per bulk path, next to baselines of one run.

Per chunk size, one batch of chunks goes through the daemon by each transport (put
after an untimed delete, then get into preallocated buffers), best of REPEATS, with
the baselines measured in between so background load hits all alike:

* raw socket: a separate process (store/daemon/bench_peer.py) streaming the same bytes
  over loopback with no framing, store or checks; the yardstick of ``stream`` and ``grpc``
* memcpy: ``numpy.copyto`` of the same bytes in this process; the yardstick of ``shm``

The daemon must be local for the raw-socket ratio to mean anything (the peer runs on
loopback), and its cpu tier must hold a batch (about ``--total`` bytes).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from store.chunk import make_chunk
from store.client import KVStoreClient
from store.stream import recv_into, tune

REPEATS = 3
MAX_CHUNKS = 1024
TARGETS = {"stream_put": 0.6, "stream_get": 0.6, "shm_get": 0.5}
"""Goals of issue 5: loopback get and put >= 0.6x raw socket; shared-memory get >= 0.5x memcpy."""


class RawPeer:
    """The raw-socket baseline process and a connection to it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "store.daemon.bench_peer"],
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        port = int(self.proc.stdout.readline())  # type: ignore[union-attr]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        tune(self.sock)

    def put(self, data: list[np.ndarray]) -> None:
        self.sock.sendall(struct.pack("<cQQ", b"p", len(data), data[0].nbytes))
        for d in data:
            self.sock.sendall(d)
        recv_into(self.sock, memoryview(bytearray(1)))

    def get(self, outs: list[np.ndarray]) -> None:
        self.sock.sendall(struct.pack("<cQQ", b"g", len(outs), outs[0].nbytes))
        for o in outs:
            recv_into(self.sock, memoryview(o))

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


def _best(fn: Callable[[], Any], reset: Callable[[], Any] | None = None) -> float:
    if reset is not None:
        reset()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(
    client: KVStoreClient, peer: RawPeer, size: int, total: int, transports: list[str]
) -> dict[str, Any]:
    """GB/s of every transport and baseline for chunks of ``size`` bytes."""
    count = max(4, min(total // size, MAX_CHUNKS))
    rng = np.random.default_rng(size)
    data = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]
    outs = [np.empty(size, dtype=np.uint8) for _ in range(count)]
    salt = os.urandom(8).hex()
    keys = [hashlib.sha256(f"bench-{salt}-{size}-{i}".encode()).hexdigest() for i in range(count)]
    chunks = [make_chunk(k, b"\0" * 32, d, 1) for k, d in zip(keys, data, strict=True)]
    best: dict[str, float] = {}

    def run(name: str, fn: Callable[[], Any], reset: Callable[[], Any] | None = None) -> None:
        best[name] = min(best.get(name, float("inf")), _best(fn, reset))

    def memcpy() -> None:
        for d, o in zip(data, outs, strict=True):
            np.copyto(o, d)

    def check(name: str, got: list[Any]) -> None:
        if any(g is None for g in got):
            raise RuntimeError(
                f"daemon lost chunks during the {name} benchmark (cpu tier too small?)"
            )

    try:
        for _ in range(REPEATS):
            run("raw_put", lambda: peer.put(data))
            run("raw_get", lambda: peer.get(outs))
            run("memcpy", memcpy)
            for t in transports:
                run(f"{t}_put", lambda t=t: check(t, [True] if all(client.put(chunks, transport=t)) else [None]),
                    lambda: client.delete(keys))  # fmt: skip
                run(f"{t}_get", lambda t=t: check(t, client.get(keys, outs, transport=t)))
                if not all(np.array_equal(o, d) for o, d in zip(outs, data, strict=True)):
                    raise RuntimeError(f"{t} get returned wrong bytes")
    finally:
        client.delete(keys)
    rates = {k: size * count / v / 1e9 for k, v in best.items()}
    return {"size": size, "chunks": count, "gbps": rates}


def run_daemon_bench(
    client: KVStoreClient, sizes: list[int], total: int, transports: list[str]
) -> dict[str, Any]:
    """Print the table; return it as a JSON-ready dict."""
    client.health()
    peer = RawPeer()
    print(
        f"daemon {client.url}: GB/s (1e9 B/s); ratios vs raw socket (stream, grpc) and memcpy (shm)"
    )
    cols = [f"{t}_{op}" for t in transports for op in ("put", "get")]
    print(f"{'size':>6} | {'raw put':>7} {'raw get':>7} {'memcpy':>7} | "
          + " ".join(f"{c:>10}" for c in cols))  # fmt: skip
    rows = []
    try:
        for size in sizes:
            row = bench_size(client, peer, size, total, transports)
            g = row["gbps"]
            row["ratios"] = {c: g[c] / _base(g, c) for c in cols}
            cells = " ".join(f"{g[c]:5.2f} {row['ratios'][c]:4.2f}" for c in cols)
            print(f"{_size(size):>6} | {g['raw_put']:7.2f} {g['raw_get']:7.2f} {g['memcpy']:7.2f} | {cells}",
                  flush=True)  # fmt: skip
            rows.append(row)
    finally:
        peer.close()
    return {"url": client.url, "unit": "GB/s (1e9 bytes/s)", "targets": TARGETS, "rows": rows}


def _base(g: dict[str, float], col: str) -> float:
    transport, op = col.split("_")
    return g["memcpy"] if transport == "shm" else g[f"raw_{op}"]


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"
