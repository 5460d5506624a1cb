"""``kvstore bench --url``: daemon put/get GB/s per bulk path, next to baselines of one run.

Per chunk size, one batch of chunks goes through the daemon by each transport (put
after an untimed delete, then get into preallocated buffers), best of REPEATS, with
the baselines measured in between so background load hits all alike:

* raw socket: a separate process (benchmarks/peers/raw_socket.py) streaming the same bytes
  over loopback with no framing, store or checks; the yardstick of ``stream`` and ``grpc``
* memcpy: ``numpy.copyto`` of the same bytes in this process; the yardstick of ``shm``
* with ``--lmcache-venv DIR``: LMCache's standalone server (``lmcache_server HOST PORT
  cpu``), driven with LMCache's own client protocol by benchmarks/peers/lmcache_driver.py in
  that environment's Python (LMCache and its torch stay out of this process): the same
  batch put then got in every repeat, next to the baselines

The daemon must be local for the raw-socket ratio to mean anything (the peer runs on
loopback), and its cpu tier must hold a batch (about ``--total`` bytes).

The peers' own code is not part of the runtime packages: it lies in the source tree's
``benchmarks/peers/``. Where that is absent (an installed wheel), the bench still runs and
reports GB/s, with the raw-socket ratios left out and a note saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvcore.chunk import make_chunk
from store.client import KVStoreClient
from store.wire.stream import recv_into, send_buffers, tune

REPEATS = 5
MAX_CHUNKS = 1024
TARGETS = {"stream_put": 0.6, "stream_get": 0.6, "shm_get": 0.5}
"""Goals of issue 5: loopback get and put >= 0.6x raw socket; shared-memory get >= 0.5x memcpy."""
LMCACHE_TARGET = 2.0
"""Goal of issue 5: at least 2x LMCache's standalone server."""


SOURCE_ROOT = Path(__file__).resolve().parents[2]
PEERS = SOURCE_ROOT / "benchmarks" / "peers"


class PeerMissing(RuntimeError):
    """A baseline's peer is not here (it ships with the source tree, not the wheel)."""


def peer_script(name: str) -> Path:
    path = PEERS / name
    if not path.is_file():
        raise PeerMissing(
            f"{path} not found: the baselines' peers ship with the source tree "
            "(benchmarks/peers/), not with the installed package"
        )
    return path


class RawPeer:
    """The raw-socket baseline process and a connection to it."""

    def __init__(self) -> None:
        peer_script("raw_socket.py")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peers.raw_socket"],
            cwd=SOURCE_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        port = int(self.proc.stdout.readline())  # type: ignore[union-attr]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        tune(self.sock)

    def put(self, data: list[np.ndarray]) -> None:
        self.sock.sendall(struct.pack("<cQQ", b"p", len(data), data[0].nbytes))
        for d in data:
            send_buffers(self.sock, [d])  # in SEND_BYTES calls, as the client sends
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
    client: KVStoreClient,
    peer: RawPeer | None,
    size: int,
    total: int,
    transports: list[str],
    repeats: int = REPEATS,
    lmcache: LMCachePeer | None = None,
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

    def run_lmcache() -> None:
        assert lmcache is not None
        for op, seconds in lmcache.measure(size, count).items():
            best[f"lmcache_{op}"] = min(best.get(f"lmcache_{op}", float("inf")), seconds)

    def memcpy() -> None:
        for d, o in zip(data, outs, strict=True):
            np.copyto(o, d)

    def check(name: str, got: list[Any]) -> None:
        if any(g is None for g in got):
            raise RuntimeError(
                f"daemon lost chunks during the {name} benchmark (cpu tier too small?)"
            )

    try:
        for _ in range(repeats):
            if peer is not None:
                run("raw_put", lambda: peer.put(data))
                run("raw_get", lambda: peer.get(outs))
            run("memcpy", memcpy)
            if lmcache is not None:
                run_lmcache()
            for t in transports:
                run(
                    f"{t}_put",
                    lambda t=t: check(
                        t, [True] if all(client.put(chunks, transport=t)) else [None]
                    ),
                    lambda: client.delete(keys),
                )
                run(f"{t}_get", lambda t=t: check(t, client.get(keys, outs, transport=t)))
                if not all(np.array_equal(o, d) for o, d in zip(outs, data, strict=True)):
                    raise RuntimeError(f"{t} get returned wrong bytes")
    finally:
        client.delete(keys)
    rates = {k: size * count / v / 1e9 for k, v in best.items()}
    return {"size": size, "chunks": count, "gbps": rates}


class LMCachePeer:
    """LMCache's lmcache_server and its driver (benchmarks/peers/lmcache_driver.py), both run
    from LMCache's own virtual environment ``venv``; one batch per ``measure`` call."""

    def __init__(self, venv: str) -> None:
        python = os.path.join(venv, "bin", "python")
        if not os.path.exists(python):
            raise RuntimeError(f"--lmcache-venv {venv}: no bin/python there")
        script = peer_script("lmcache_driver.py")
        self.proc = subprocess.Popen(
            [python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._answer()  # {"ready": true} once lmcache_server accepts connections

    def _answer(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"LMCache driver exited with status {self.proc.wait(10)}")
        return json.loads(line)

    def measure(self, size: int, count: int) -> dict[str, float]:
        """Seconds to put, then get, ``count`` chunks of ``size`` bytes."""
        self.proc.stdin.write(json.dumps({"size": size, "count": count}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_daemon_bench(
    client: KVStoreClient,
    sizes: list[int],
    total: int,
    transports: list[str],
    lmcache_venv: str | None = None,
    repeats: int = REPEATS,
) -> dict[str, Any]:
    """Print the table; return it as a JSON-ready dict."""
    client.health()
    lmcache = LMCachePeer(lmcache_venv) if lmcache_venv else None
    try:
        peer: RawPeer | None = RawPeer()
    except PeerMissing as exc:
        print(f"raw-socket baseline left out: {exc}")
        peer = None
    print(
        f"daemon {client.url}: GB/s (1e9 B/s); ratios vs raw socket (stream, grpc) and memcpy (shm)"
    )
    cols = [f"{t}_{op}" for t in transports for op in ("put", "get")]
    print(
        f"{'size':>6} | {'raw put':>7} {'raw get':>7} {'memcpy':>7} | "
        + " ".join(f"{c:>10}" for c in cols)
    )
    rows = []
    try:
        for size in sizes:
            row = bench_size(client, peer, size, total, transports, repeats, lmcache)
            g = row["gbps"]
            row["ratios"] = {c: g[c] / b for c in cols if (b := _base(g, c))}
            cells = " ".join(f"{g[c]:5.2f} {_cell(row['ratios'].get(c))}" for c in cols)
            raw = f"{_cell(g.get('raw_put'), 7)} {_cell(g.get('raw_get'), 7)}"
            print(f"{_size(size):>6} | {raw} {g['memcpy']:7.2f} | {cells}", flush=True)
            rows.append(row)
    finally:
        if peer is not None:
            peer.close()
        if lmcache is not None:
            lmcache.close()
    report: dict[str, Any] = {
        "url": client.url,
        "unit": "GB/s (1e9 bytes/s)",
        "targets": TARGETS,
        "rows": rows,
    }
    if lmcache is not None:
        print("LMCache lmcache_server (cpu), measured in the same repeats: GB/s, and ratios to it")
        ours = [c for c in cols if not c.startswith("grpc")] or cols
        head = f"{'size':>6} | {'lmc put':>7} {'lmc get':>7} | "
        print(head + " ".join(f"{c:>10}" for c in ours))
        for row in rows:
            g = row["gbps"]
            row["vs_lmcache"] = {c: g[c] / g[f"lmcache_{c.split('_')[1]}"] for c in cols}
            cells = " ".join(f"{row['vs_lmcache'][c]:9.2f}x" for c in ours)
            size = _size(row["size"])
            print(
                f"{size:>6} | {g['lmcache_put']:7.2f} {g['lmcache_get']:7.2f} | {cells}", flush=True
            )
        report["lmcache_target"] = LMCACHE_TARGET
    return report


def _base(g: dict[str, float], col: str) -> float | None:
    transport, op = col.split("_")
    return g["memcpy"] if transport == "shm" else g.get(f"raw_{op}")


def _cell(x: float | None, width: int = 4) -> str:
    return "-".rjust(width) if x is None else f"{x:{width}.2f}"


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"
