"""The daemon's door for clients on its own host: who they are, and its shared pool.

Two things a same-host client needs cannot travel over its TCP stream connection:

* **the pool's descriptor.** A file descriptor crosses between processes only over a
  Unix socket (``SCM_RIGHTS``). The client gets a read-only one of the daemon's shared
  cpu pool (kvcore/shared_memory.py) and maps it.
* **its pid, vouched for by the kernel.** Before the daemon reads a client's put
  payloads out of its memory (store/wire/cma.py), it must know which process that client is.
  A pid the client merely states could name another process of the same user; the pid
  of the peer of a Unix socket (``SO_PEERCRED``) is the kernel's word.

So the daemon listens on a Unix socket in Linux's abstract namespace (a random name,
nothing in any file system to clean up). Anyone in the network namespace can connect
to it, so connecting is not enough: the client presents a one-time ticket, which the
daemon hands out only on an authenticated stream connection whose client has already
proved it shares the host (the nonce of its region, store/wire/shm.py). Redeeming the ticket
gives the client the pool's descriptor (when the pool is shared) and tells that stream
session the redeemer's pid. A ticket is good once and for ``TICKET_SECONDS``.

Where this cannot work (no abstract sockets, a client in another network namespace),
the client keeps the region path: the daemon copies payloads into its region and out.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

TICKET_SECONDS = 30.0
MAX_TICKETS = 4096
TICKET_BYTES = 32  # hex characters
VISIT_SECONDS = 2.0  # a whole redemption, connect to descriptor
MAX_VISITORS = 64  # redemptions in progress at once
_UCRED = struct.Struct("3i")  # pid, uid, gid


class SameHost:
    """Redeems tickets on a Unix socket: records each redeemer's pid and hands it
    ``reader_fd`` of ``shared`` (a SharedBuffer), when the pool is shared."""

    def __init__(self, shared: Any = None) -> None:
        self.nbytes = shared.nbytes if shared is not None else 0
        self.name = f"kvstore-{secrets.token_hex(12)}"
        self._fd = shared.reader_fd() if shared is not None else -1
        self._tickets: dict[bytes, float] = {}  # issued, not yet redeemed: deadline
        self._peers: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # redeemed: pid, uid
        self._lock = threading.Lock()
        self._active = 0  # redemptions in progress
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind("\0" + self.name)
            self._sock.listen(64)
        except OSError:
            self.close()
            raise
        threading.Thread(target=self._accept, name="kvstore-same-host", daemon=True).start()

    def offer(self) -> dict[str, Any]:
        """What a client needs to come to the door: socket name, ticket, pool size (0:
        no shared pool)."""
        ticket = secrets.token_hex(TICKET_BYTES // 2).encode()
        now = time.monotonic()
        with self._lock:
            if len(self._tickets) >= MAX_TICKETS:
                self._tickets = {t: d for t, d in self._tickets.items() if d > now}
                while len(self._tickets) >= MAX_TICKETS:  # all fresh: drop the oldest
                    self._tickets.pop(next(iter(self._tickets)))
            self._tickets[ticket] = now + TICKET_SECONDS
        return {"socket": self.name, "ticket": ticket.decode(), "size": self.nbytes}

    def peer(self, ticket: Any) -> tuple[int, int] | None:
        """(pid, uid) of the process that redeemed ``ticket``, per the kernel; None if no
        one has (yet). Each redeemed ticket answers once."""
        if not isinstance(ticket, str):
            return None
        with self._lock:
            return self._peers.pop(ticket.encode(), None)

    def _redeem(self, ticket: bytes, pid: int, uid: int) -> bool:
        with self._lock:
            deadline = self._tickets.pop(ticket, None)
            if deadline is None or deadline <= time.monotonic():
                return False
            self._peers[ticket] = (pid, uid)
            while len(self._peers) > MAX_TICKETS:  # redeemed, never asked about
                self._peers.popitem(last=False)
        return True

    def _accept(self) -> None:
        while (listener := self._sock) is not None:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._sock is None:
                    return  # closed
                log.warning("same-host door: accept failed (%s); retrying", exc)
                time.sleep(0.1)  # e.g. out of descriptors for a moment
                continue
            with self._lock:
                busy = self._active >= MAX_VISITORS
                self._active += 0 if busy else 1
            if busy:  # a crowd at the door: turn the newcomer away, not the next client
                conn.close()
                continue
            threading.Thread(
                target=self._visit, args=(conn,), daemon=True, name="kvstore-same-host-visit"
            ).start()

    def _visit(self, conn: socket.socket) -> None:
        """One redemption, within VISIT_SECONDS in all (a slow or silent visitor holds
        only its own thread)."""
        deadline = time.monotonic() + VISIT_SECONDS
        try:
            pid, uid, _ = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            ticket = b""
            while len(ticket) < TICKET_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                conn.settimeout(left)
                more = conn.recv(TICKET_BYTES - len(ticket))
                if not more:
                    return
                ticket += more
            conn.settimeout(max(deadline - time.monotonic(), 0.01))
            if not self._redeem(ticket, pid, uid):
                conn.sendall(b"n")
                return
            with self._lock:  # not closed under us
                if self._fd >= 0:
                    socket.send_fds(conn, [b"k"], [self._fd])
                    return
            conn.sendall(b"k")
        except OSError as exc:
            log.debug("same-host door: a client went away mid-handoff (%s)", exc)
        finally:
            conn.close()
            with self._lock:
                self._active -= 1

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            sock.close()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def redeem(offer: dict[str, Any], timeout: float) -> tuple[bool, int | None]:
    """Client side: present the ticket of ``offer`` (from ``SameHost.offer``). Returns
    whether the daemon took it (it now knows this process's pid) and the pool's
    read-only descriptor, if it sent one (the caller closes it)."""
    name, ticket = offer.get("socket"), offer.get("ticket")
    if not isinstance(name, str) or not isinstance(ticket, str) or len(ticket) != TICKET_BYTES:
        return False, None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect("\0" + name)
        sock.sendall(ticket.encode())
        msg, fds, _, _ = socket.recv_fds(sock, 1, 1, socket.MSG_CMSG_CLOEXEC)
        if msg != b"k":
            for fd in fds:
                os.close(fd)
            return False, None
        return True, (fds[0] if fds else None)
    except OSError as exc:
        log.debug("no same-host door at the daemon (%s); the region path serves", exc)
        return False, None
    finally:
        sock.close()
