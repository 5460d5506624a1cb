"""UCX (through ``ucxx``) as the daemon's bulk-data wire: the stream protocol of
store/wire/stream.py, unchanged, carried by a UCX endpoint instead of a TCP socket.

Optional: ``pip install 'kvstore[ucx]'`` (the ``ucxx-cu12`` wheel, which brings its own
UCX build). UCX picks the transport itself (``UCX_TLS``: RDMA verbs, shared memory,
CUDA IPC, TCP, ...), so on an RDMA/NVLink cluster the same code moves the payloads over
the fastest link the two hosts share; on a plain machine it runs over TCP.

How a connection starts (the bootstrap is the daemon's ordinary stream port, so UCX
needs no port of its own and reuses its ``hello`` and bearer token):

1. the client opens a stream connection and sends ``hello`` as usual;
2. it creates its own UCX worker and sends ``{"op": "ucx", "address": <worker address>}``;
3. the daemon (started with ``--ucx``) creates a worker for this connection, an endpoint
   to the client's address, answers ``{"ok": True, "address": <its worker address>}``
   on the socket, then sends a ``{"ok": True, "ucx": True}`` frame over UCX;
4. the client connects an endpoint to the daemon's address and reads that frame: from
   then on every frame and payload of the connection goes over UCX (UCP's stream API,
   a byte stream like TCP, so the frames and the scattered ``recv_into`` of payloads
   straight into the caller's buffers are exactly those of the socket path).

Each connection has its own worker on both sides, progressed by the one thread that uses
the connection (blocking progress: ``epoll`` on the worker's event fd, so an idle
connection costs no CPU). Every wait has the connection's deadline; a peer that dies is
an endpoint error (a ``ConnectionError`` within milliseconds on TCP), a peer that stops
answering a ``TimeoutError`` at the deadline: both are misses upstream. After either,
the connection is closed, never reused.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

INSTALL_HINT = "pip install 'kvstore[ucx]' (the ucxx-cu12 package)"
_TICK_MS = 200  # longest single epoll wait: how often a waiter re-checks its deadline


class UcxUnavailable(RuntimeError):
    """ucxx is not installed or UCX cannot start here."""


_lib: Any = None
_Array: Any = None
_context: Any = None
_lock = threading.Lock()


def load() -> Any:
    """The ``ucxx._lib.libucxx`` module (imported on first use)."""
    global _lib, _Array
    if _lib is None:
        # ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows and warns about
        # on every start; keep that one warning quiet unless the user chose otherwise.
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        try:
            import ucxx  # noqa: F401  (loads the bundled libucx / libucxx)
            import ucxx._lib.libucxx as lib
            from ucxx._lib.arr import Array
        except ImportError as exc:
            raise UcxUnavailable(f"the UCX transport needs ucxx: {INSTALL_HINT} ({exc})") from None
        _lib, _Array = lib, Array
    return _lib


def context() -> Any:
    """The process's UCX context (stream API + wake-ups), created once."""
    global _context
    lib = load()
    with _lock:
        if _context is None:
            try:
                _context = lib.UCXContext(feature_flags=(lib.Feature.STREAM, lib.Feature.WAKEUP))
            except Exception as exc:  # UCXError subclasses are created at run time
                raise UcxUnavailable(f"UCX did not start: {exc}") from None
        return _context


def new_worker() -> Any:
    lib = load()
    worker = lib.UCXWorker(context())
    worker.init_blocking_progress_mode()
    return worker


def connect_to(worker: Any, address: bytes) -> Any:
    """An endpoint of ``worker`` to the worker at ``address`` (with peer-failure
    detection, so a dead peer fails requests instead of leaving them pending)."""
    lib = load()
    return lib.UCXEndpoint.create_from_worker_address(
        worker, lib.UCXAddress.create_from_buffer(bytes(address)), True
    )


class UcxSocket:
    """The part of ``socket.socket`` that store/wire/stream.py uses, over one UCX endpoint.

    ``recv_into`` and ``recvmsg_into`` always fill what they are given (UCX's stream
    receive waits for all the bytes), which is what the stream helpers loop for anyway.
    ``alive()``, when given, is asked at least every 200 ms while waiting: False ends
    the wait with ConnectionError (the daemon closing its port)."""

    def __init__(
        self,
        worker: Any,
        endpoint: Any,
        timeout: float | None,
        bootstrap: Any = None,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.worker = worker
        self.endpoint = endpoint
        self.timeout = timeout
        self.bootstrap = bootstrap  # the stream socket the connection started on
        self.alive = alive
        self.closed = False

    # -- the socket surface ---------------------------------------------------------
    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def gettimeout(self) -> float | None:
        return self.timeout

    def sendmsg(self, buffers: Sequence[Any], *_: Any) -> int:
        arrays = [_Array(b) for b in buffers if memoryview(b).nbytes]
        self._wait([self.endpoint.stream_send(a) for a in arrays])
        return sum(a.nbytes for a in arrays)

    def sendall(self, data: Any) -> None:
        self.sendmsg([data])

    def recv_into(self, view: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(view).cast("B")
        if nbytes:
            view = view[:nbytes]
        if view.nbytes:
            self._wait([self.endpoint.stream_recv(_Array(view))])
        return view.nbytes

    def recvmsg_into(self, views: Sequence[Any], *_: Any) -> tuple[int, list, int, None]:
        arrays = [_Array(v) for v in views if memoryview(v).nbytes]
        self._wait([self.endpoint.stream_recv(a) for a in arrays])
        return sum(a.nbytes for a in arrays), [], 0, None

    def shutdown(self, how: int) -> None:
        self.closed = True

    def close(self) -> None:
        """Drop the endpoint and worker (requests still pending are cancelled first, so
        UCX writes into no buffer of ours afterwards) and the bootstrap socket."""
        if self.worker is None:
            return
        self.closed = True
        try:
            self.worker.cancel_inflight_requests()
        except Exception:
            pass
        self.endpoint = self.worker = None
        if self.bootstrap is not None:
            self.bootstrap.close()
            self.bootstrap = None

    def fileno(self) -> int:
        return -1

    # -- waiting ----------------------------------------------------------------------
    def _wait(self, requests: list[Any]) -> None:
        """Progress this connection's worker until ``requests`` complete, within the
        deadline; UCX errors become ConnectionError, the deadline TimeoutError."""
        if self.worker is None:
            raise ConnectionError("UCX connection is closed")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            for req in requests:
                while not req.completed:
                    if self.closed or (self.alive is not None and not self.alive()):
                        raise ConnectionError("UCX connection closed")
                    tick = _TICK_MS
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError(f"UCX transfer timed out after {self.timeout}s")
                        tick = max(1, min(tick, int(left * 1000)))
                    self.worker.progress_worker_event(epoll_timeout=tick)
                try:
                    req.check_error()
                except Exception as exc:  # ucxx's error classes are made at import time
                    raise ConnectionError(f"UCX: {type(exc).__name__}: {exc}") from None
        except BaseException:
            self.close()  # the byte stream is out of step: never reuse it
            raise


# -- the two ends of the bootstrap ------------------------------------------------------
def client_upgrade(sock: Any, timeout: float, connect_timeout: float) -> UcxSocket:
    """Move the stream connection ``sock`` (after ``hello``) onto UCX; the returned
    socket owns ``sock`` and closes it with itself. RemoteError if the daemon has no UCX."""
    from store.wire.messages import Ucx, UcxReply
    from store.wire.stream import check_reply, recv_frame, send_frame

    worker = new_worker()
    send_frame(sock, Ucx(bytes(worker.address)).to_wire())
    reply = UcxReply.from_wire(check_reply(recv_frame(sock)))
    assert reply.address is not None
    ucx = UcxSocket(worker, connect_to(worker, reply.address), connect_timeout, sock)
    try:
        ready = UcxReply.from_wire(check_reply(recv_frame(ucx)))  # type: ignore[arg-type]
        if ready.address is not None:
            raise ConnectionError("daemon did not confirm the UCX connection")
    except BaseException:
        ucx.close()
        raise
    ucx.settimeout(timeout)
    return ucx


def daemon_accept(
    meta: dict[str, Any], timeout: float | None, alive: Callable[[], bool]
) -> tuple[UcxSocket, bytes]:
    """The daemon's side of ``{"op": "ucx"}``: a connected UcxSocket and the address to
    send back on the stream socket (ValueError for an unusable client address)."""
    from store.wire.messages import Ucx

    address = Ucx.from_wire(meta).address  # BadRequest, a ValueError
    worker = new_worker()
    try:
        endpoint = connect_to(worker, address)
    except Exception as exc:
        raise ValueError(f"cannot reach the client's UCX worker address: {exc}") from None
    return UcxSocket(worker, endpoint, timeout, alive=alive), bytes(worker.address)
