"""Start ``kvstore serve`` as a real subprocess on free ports, for the daemon tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from benchmarks.harness import DAEMON_READY, Child, scrape_metrics
from kvcore.chunk import Chunk, make_chunk
from kvcore.keys import sha256_cbor
from store.client import KVStoreClient

FP = b"\x07" * 32


@dataclass
class DaemonProc:
    """A running daemon: its process, gRPC url and metrics port."""

    proc: Child
    port: int
    metrics_port: int | None
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"kvstore://127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill_group()

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM, wait; the exit status (-9 if it had to be killed)."""
        return self.proc.stop(timeout)


def start_daemon(*args: str, port: int = 0, timeout: float = 60) -> DaemonProc:
    """``kvstore serve --port PORT --metrics-port 0 ARGS``, once it prints its ready line."""
    argv = [
        sys.executable,
        "-m",
        "store.cli",
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--drain-timeout",
        "5",
        *args,
    ]
    proc = Child(argv)
    m = proc.wait_for_line(DAEMON_READY, timeout, "kvstore serve")
    metrics = None if m.group(4) == "-" else int(m.group(4))
    return DaemonProc(proc, int(m.group(2)), metrics, list(args))


def key(i: int, tag: str = "") -> str:
    """A well-formed chunk key (64 lowercase hex)."""
    return sha256_cbor(f"{tag}-{i}").hex()


def chunk(i: int, size: int = 4096, tag: str = "", fp: bytes = FP) -> Chunk:
    kv = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).reshape(1, 2, -1, 1, 1)
    return make_chunk(key(i, tag), fp, kv, kv.shape[2], dtype="uint8")


def same(got: Chunk | None, want: Chunk) -> bool:
    return (
        got is not None
        and got.header == want.header
        and bytes(np.asarray(got.payload)) == bytes(want.payload)
    )


@contextmanager
def daemon_client(*args: str) -> Iterator[KVStoreClient]:
    """A client of a daemon started with ``args``, which must exit cleanly afterwards."""
    d = start_daemon(*args)
    with KVStoreClient(d.url, timeout=10) as c:
        yield c
    assert d.terminate() == 0


class PinCounts(dict):
    """Pins per key, counted by ``pin`` and ``unpin`` as a ``LeaseTable`` calls them."""

    def pin(self, keys) -> None:
        for k in keys:
            self[k] = self.get(k, 0) + 1

    def unpin(self, keys) -> None:
        for k in keys:
            self[k] -= 1


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a daemon's /metrics: {(name, sorted labels): value}."""
    return scrape_metrics(f"http://127.0.0.1:{port}")
