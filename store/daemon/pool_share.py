"""Hands same-host clients a read-only descriptor of the daemon's shared cpu pool.

A descriptor can only cross between processes over a Unix socket (``SCM_RIGHTS``), so
the daemon listens on one in Linux's abstract namespace: a random name, nothing in any
file system to clean up. Anyone in the same network namespace could connect to it, so
connecting is not enough: the client must present a one-time ticket, which the daemon
hands out only on an authenticated stream connection whose client has already proved
it shares this host (the nonce of its shared-memory region, store/shm.py). A ticket is
good once and for ``TICKET_SECONDS``.

Where this cannot work (no abstract sockets, a client in another network namespace),
the client keeps the region path, where the daemon copies payloads into its region.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

TICKET_SECONDS = 30.0
MAX_TICKETS = 4096
TICKET_BYTES = 32  # hex characters


class PoolShare:
    """Serves ``reader_fd`` of ``shared`` (a SharedBuffer) to clients holding a ticket."""

    def __init__(self, shared: Any) -> None:
        self.nbytes = shared.nbytes
        self.name = f"kvstore-pool-{secrets.token_hex(12)}"
        self._fd = shared.reader_fd()
        self._tickets: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind("\0" + self.name)
            self._sock.listen(64)
        except OSError:
            self._sock.close()
            os.close(self._fd)
            raise
        threading.Thread(target=self._accept, name="kvstore-pool-share", daemon=True).start()

    def offer(self) -> dict[str, Any]:
        """What a client needs to fetch the descriptor: socket name, ticket, pool size."""
        ticket = secrets.token_hex(TICKET_BYTES // 2).encode()
        now = time.monotonic()
        with self._lock:
            if len(self._tickets) >= MAX_TICKETS:
                self._tickets = {t: d for t, d in self._tickets.items() if d > now}
                while len(self._tickets) >= MAX_TICKETS:  # all fresh: drop the oldest
                    self._tickets.pop(next(iter(self._tickets)))
            self._tickets[ticket] = now + TICKET_SECONDS
        return {"socket": self.name, "ticket": ticket.decode(), "size": self.nbytes}

    def _redeem(self, ticket: bytes) -> bool:
        with self._lock:
            deadline = self._tickets.pop(ticket, None)
        return deadline is not None and deadline > time.monotonic()

    def _accept(self) -> None:
        while (listener := self._sock) is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                conn.settimeout(5.0)
                ticket = b""
                while len(ticket) < TICKET_BYTES:
                    more = conn.recv(TICKET_BYTES - len(ticket))
                    if not more:
                        break
                    ticket += more
                if self._redeem(ticket):
                    socket.send_fds(conn, [b"k"], [self._fd])
                else:
                    conn.sendall(b"n")
            except OSError as exc:
                log.debug("pool share: a client went away mid-handoff (%s)", exc)
            finally:
                conn.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            os.close(self._fd)


def fetch_pool_fd(offer: dict[str, Any], timeout: float) -> int | None:
    """Client side: redeem ``offer`` (from ``PoolShare.offer``) for the pool's read-only
    descriptor; None where this process cannot reach the daemon's socket."""
    name, ticket = offer.get("socket"), offer.get("ticket")
    if not isinstance(name, str) or not isinstance(ticket, str) or len(ticket) != TICKET_BYTES:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect("\0" + name)
        sock.sendall(ticket.encode())
        msg, fds, _, _ = socket.recv_fds(sock, 1, 1)
        if msg != b"k" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return None
        return fds[0]
    except OSError as exc:
        log.debug("no shared pool from the daemon (%s); gets copy through the region", exc)
        return None
    finally:
        sock.close()
