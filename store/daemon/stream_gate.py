"""The stream port's door: who gets a connection, how long it may take to say ``hello``,
and an accept loop that outlives running out of file descriptors.

Before ``hello`` a peer is unknown, so it may cost the daemon only a small, fixed amount:

* at most ``max_connections`` connections are open at once; one more gets a single
  RESOURCE_EXHAUSTED frame and is closed (its thread is never started);
* a connection that has not completed ``hello`` within ``handshake_timeout`` seconds of
  being accepted is shut down, however it spends that time (silent, or dripping bytes):
  one watcher thread keeps the deadlines, in arrival order, so each costs nothing more;
* its frames are held to HELLO_LIMITS (session.py reads them with these).

``accept`` failing for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
is logged once per episode and retried after ACCEPT_BACKOFF, as Redis does; the
connections waiting in the backlog are served once descriptors are free. Any other
failure ends the loop for good: ``serving`` turns False and Health says ``not_serving``.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable

from store.wire.messages import Error
from store.wire.stream import MAX_META_BYTES, FrameLimits, send_frame, tune

log = logging.getLogger(__name__)

ACCEPT_BACKOFF = 0.1
"""Seconds the accept loop waits after failing for want of descriptors or memory."""

HELLO_LIMITS = FrameLimits(max_bytes=16 << 10, max_list=256, max_map=32, max_containers=64)
"""Frames before ``hello``: room for a long token, and little else to decode."""

_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2): errors of a connection that died in the backlog; the next one may be fine
_PEER_GONE = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.EAGAIN,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)


def request_limits(max_batch: int) -> FrameLimits:
    """Frames after ``hello``: up to MAX_META_BYTES, lists as long as a batch (or a
    million items), and lists and maps enough for a put of ``max_batch`` chunks in as
    many groups (five lists each: store/wire/put_frame.py)."""
    return FrameLimits(MAX_META_BYTES, max(1 << 20, max_batch), 64, 8 * max_batch + 64)


class StreamGate:
    """The open connections of one stream port, their cap and their hello deadlines."""

    def __init__(
        self,
        max_connections: int,
        handshake_timeout: float,
        turned_away: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self._turned_away = turned_away  # called with "cap" or "handshake" (a metric)
        self.serving = False  # the accept loop runs
        self._open: set[socket.socket] = set()
        self._waiting: dict[socket.socket, float] = {}  # deadline of hello, in arrival order
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def start(self, listener: socket.socket, serve: Callable[[socket.socket, str], None]) -> None:
        """Accept on ``listener`` in the background; ``serve(conn, peer)`` runs on a new
        thread per admitted connection (and must call ``leave(conn)`` when done)."""
        self.serving = True
        threading.Thread(
            target=self._accept, args=(listener, serve), name="kvstore-stream-accept", daemon=True
        ).start()
        threading.Thread(target=self._watch, name="kvstore-stream-hello", daemon=True).start()

    def close(self) -> None:
        """After the listener closed: stop the watcher, shut every connection down."""
        self._closed.set()
        with self._lock:
            for conn in self._open:
                shutdown(conn)

    def greeted(self, conn: socket.socket) -> bool:
        """``conn`` completed hello: its deadline is lifted. False if it had passed."""
        with self._lock:
            return self._waiting.pop(conn, None) is not None

    def leave(self, conn: socket.socket) -> None:
        """``conn`` is done (before it is closed: its descriptor may be reused)."""
        with self._lock:
            self._open.discard(conn)
            self._waiting.pop(conn, None)

    def _admit(self, conn: socket.socket) -> bool:
        with self._lock:
            if len(self._open) >= self.max_connections:
                return False
            self._open.add(conn)
            self._waiting[conn] = time.monotonic() + self.handshake_timeout
            return True

    def _accept(self, listener: socket.socket, serve: Callable[[socket.socket, str], None]) -> None:
        starved = False
        try:
            while not self._closed.is_set():
                try:
                    conn, peer = listener.accept()
                except OSError as exc:
                    if self._closed.is_set() or listener.fileno() < 0:
                        return  # closed by stop()
                    if exc.errno in _PEER_GONE:
                        continue
                    if exc.errno not in _STARVED:
                        log.error(
                            "stream port: accept failed for good (%s): it serves no "
                            "new connections, and Health says not_serving",
                            exc,
                        )
                        return
                    if not starved:
                        log.warning(
                            "stream port: accept failed (%s): out of file descriptors "
                            "or memory; retrying every %.1f s (raise ulimit -n, or "
                            "lower --max-connections)",
                            exc,
                            ACCEPT_BACKOFF,
                        )
                    starved = True
                    time.sleep(ACCEPT_BACKOFF)
                    continue
                if starved:
                    log.warning("stream port: accepting connections again")
                    starved = False
                self._start(conn, peer, serve)
        finally:
            self.serving = False

    def _start(self, conn: socket.socket, peer: object, serve: Callable) -> None:
        """Serve ``conn`` on a thread of its own, or turn it away."""
        try:
            tune(conn)
        except OSError:  # reset already
            conn.close()
            return
        if not self._admit(conn):
            self._turned_away("cap")
            _turn_away(
                conn,
                f"the daemon serves its maximum of {self.max_connections} "
                "connections (--max-connections); try again later",
            )
            return
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        try:
            threading.Thread(
                target=serve, args=(conn, name), name="kvstore-stream", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had: like EMFILE, wait a little
            self.leave(conn)
            conn.close()
            time.sleep(ACCEPT_BACKOFF)

    def _watch(self) -> None:
        """Shut down connections whose hello deadline passed (their thread then ends)."""
        while not self._closed.is_set():
            with self._lock:
                now = time.monotonic()
                while self._waiting:
                    conn, deadline = next(iter(self._waiting.items()))
                    if deadline > now:
                        break
                    del self._waiting[conn]
                    shutdown(conn)
                    self._turned_away("handshake")
                first = next(iter(self._waiting.values()), now + self.handshake_timeout)
            self._closed.wait(max(first - now, 0.01))


def _turn_away(conn: socket.socket, message: str) -> None:
    """One error frame, then close. What the peer sent already is read first, so the
    close is a FIN after the frame and not a reset that could discard it."""
    try:
        conn.setblocking(False)
        send_frame(conn, Error("RESOURCE_EXHAUSTED", message).to_wire())
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1 << 16)
    except OSError:
        pass
    finally:
        conn.close()


def shutdown(conn: socket.socket) -> None:
    """Both directions of ``conn`` shut down: a thread blocked reading it wakes up."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
