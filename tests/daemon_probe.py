"""Probes of a running daemon from outside, for the hardening and fuzz tests: its memory,
its output, and raw connections to its ports that bypass the client's manners."""

from __future__ import annotations

import os
import select
import socket
import time

from daemon_proc import DaemonProc

from store.wire.stream import StreamClosed, encode_frame, recv_frame


def memory(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of process ``pid`` in bytes: its resident memory now and at peak."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


class PeakMemory:
    """How far the resident memory of process ``pid`` rose above its level at ``start``
    (the kernel's peak, VmHWM, reset to the current size there: /proc/PID/clear_refs)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = 0

    def start(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        self.base = memory(self.pid)[0]

    def grown(self) -> int:
        return memory(self.pid)[1] - self.base


def output(d: DaemonProc) -> str:
    """What the daemon printed (stdout and stderr) since the last call, without blocking.

    Reading it also keeps the pipe from filling, which would stall a daemon that logs."""
    fd = d.proc.stdout.fileno()  # type: ignore[union-attr]
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def stream_port(d: DaemonProc, token: str | None = None) -> int:
    from store.client import KVStoreClient

    with KVStoreClient(d.url, token, timeout=10) as c:
        return c.health().stream_port


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def frame(meta: object) -> bytes:
    """``meta`` as a stream frame (any msgpack value, not only a map)."""
    return encode_frame(meta)


def hello(sock: socket.socket, token: str | None) -> dict:
    sock.sendall(frame({"op": "hello", "token": token, "client": "probe"}))
    return recv_frame(sock)


def answers(sock: socket.socket, timeout: float = 10.0) -> list[dict]:
    """Every frame the daemon sends on ``sock`` until it closes the connection (a reset
    after its last frame counts as closed); raises TimeoutError if it stays open past
    ``timeout`` seconds."""
    sock.settimeout(timeout)
    got = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            got.append(recv_frame(sock))
        except (StreamClosed, ConnectionResetError):
            return got
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon kept the connection open")


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """True once the daemon closes ``sock`` (read returns nothing, or a reset), False if
    it is still open after ``timeout`` seconds. Frames sent before closing are dropped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return False
        try:
            if not sock.recv(1 << 16):
                return True
        except ConnectionResetError:
            return True
    return False
