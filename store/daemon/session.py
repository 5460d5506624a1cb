"""One stream connection's session: who the client is, and what it has attached.

The first frame must be ``hello`` (with the bearer token when one is configured; its
grant, auth.py, then holds for the connection: PERMISSION_DENIED for what it lacks).
Then, besides ``get`` (stream_get.py) and ``put`` (put_path.py):

* ``ucx`` (with ``--ucx``) moves the connection onto UCX: store/wire/ucx_transport.py.
* ``attach`` maps the client's shared-memory region (store/wire/shm.py) after checking the
  nonce at its start: proof that client and daemon share a host; the reply opens the
  same-host door (store/wire/same_host.py) to an unbound token.
* ``cma`` asks whether puts may be read from the client's memory (store/wire/cma.py); the
  daemon answers from the pid the kernel gave for the client at its same-host door.

Bad input gets an ``INVALID_ARGUMENT`` error frame. If payload bytes were left unread,
the session ends after the error, since the stream is out of step.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from store.daemon.activity import Draining
from store.daemon.auth import OPEN, Grant, PermissionDenied
from store.daemon.checks import BadRequest
from store.daemon.put_path import OutOfStep, StreamPut, probe_cma
from store.daemon.stream_gate import HELLO_LIMITS
from store.daemon.stream_get import StreamGet
from store.wire import messages as m
from store.wire.constants import UCX_HANDSHAKE_TIMEOUT
from store.wire.shm import RegionError, RegionFile
from store.wire.stream import PROTOCOL_VERSION, send_frame

if TYPE_CHECKING:
    from store.daemon.stream_server import StreamServer

OPS = "hello, attach, cma, get, put"


class Session:
    """State of one connection: its grant (None until authenticated), its client name,
    its region; its get and put paths."""

    def __init__(self, server: StreamServer, conn: Any, peer: str) -> None:
        self.server = server
        self.service = server.service
        self.activity = server.activity
        self.conn: Any = conn  # the socket, or a UcxSocket once moved onto UCX
        self.wire = "stream"  # the metrics label of non-region requests: stream or ucx
        self.client = peer
        self.grant: Grant | None = None if server.auth.required else OPEN
        self.greeted = False  # hello succeeded: the handshake deadline is lifted
        self.limits = HELLO_LIMITS  # what a frame may be (stream_gate.py); more after hello
        self.region: RegionFile | None = None
        self.cma_pid: int | None = None  # the client's pid, when puts may read its memory
        self.cma_at: int | None = None  # where the client says it has the region mapped
        self.cma_nonce = b""  # the region's nonce at attach
        self.ticket: str | None = None  # this session's ticket at the same-host door
        self._io: ThreadPoolExecutor | None = None
        self.gets = StreamGet(self)
        self.puts = StreamPut(self)
        self._handlers = {
            "attach": self._attach,
            "cma": self._cma,
            "get": self.gets.serve,
            "put": self.puts.serve,
        }

    def io(self) -> ThreadPoolExecutor:
        """This connection's helper thread: it fetches a get's next part while this
        thread sends the last, and checks and stores a put's payloads while this thread
        receives the next ones (socket calls and copies release the GIL)."""
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="kvstore-stream-io")
        return self._io

    def handle(self, meta: dict[str, Any]) -> bool:
        """Serve one request; False when the connection must close."""
        op = meta.get("op")
        try:
            if op == "hello":
                return self._hello(meta) and self._greeted()
            if self.grant is None:
                return self._error(
                    "UNAUTHENTICATED", "send hello with the bearer token first", False
                )
            if op == "ucx":
                return self._ucx(meta)
            handler = self._handlers.get(op) if type(op) is str else None
            if handler is None:
                message = f"unknown op {str(op)[:40]!r} (the stream has {OPS})"
                return self._error("INVALID_ARGUMENT", message, True)
            with self.activity.request(self.client, op.capitalize(), self._transport(meta)):
                handler(meta)
            return True
        except BadRequest as exc:
            return self._error("INVALID_ARGUMENT", str(exc), True, op)
        except OutOfStep as exc:
            return self._error("INVALID_ARGUMENT", str(exc), False, op)
        except Draining as exc:
            return self._error("UNAVAILABLE", str(exc), meta.get("op") != "put", op)
        except PermissionDenied as exc:  # a put's payload bytes were read or never sent
            return self._error("PERMISSION_DENIED", str(exc), True, op)

    def _transport(self, meta: dict[str, Any]) -> str:
        return "shm" if meta.get("region") or meta.get("cma") is not None else self.wire

    def refuse(self, message: str) -> None:
        """Answer something that was not a frame (the connection closes after)."""
        self._error("INVALID_ARGUMENT", message, False)

    def _error(self, code: str, message: str, keep: bool, op: Any = None) -> bool:
        self.activity.errors.labels(str(op).capitalize()[:16], code).inc()
        send_frame(self.conn, m.Error(code, message).to_wire())
        return keep

    def _greeted(self) -> bool:
        """After a successful hello: lift the deadline, allow request-sized frames.
        False (hang up) if the deadline had passed already."""
        if not self.greeted:
            self.greeted = self.server.gate.greeted(self.conn)
            self.limits = self.server.request_limits
        return self.greeted

    def _hello(self, meta: dict[str, Any]) -> bool:
        hello = m.Hello.from_wire(meta)
        grant = self.server.auth.grant(hello.token)
        if grant is None:
            return self._error("UNAUTHENTICATED", "missing or wrong bearer token", False, "hello")
        self.grant = grant
        if hello.client:
            self.client = hello.client
        limits = self.service.limits
        reply = m.HelloReply(
            PROTOCOL_VERSION, limits.max_batch, limits.max_chunk_bytes, limits.max_request_bytes
        )
        send_frame(self.conn, reply.to_wire())
        return True

    def _ucx(self, meta: dict[str, Any]) -> bool:
        """Move this connection onto UCX (store/wire/ucx_transport.py has the handshake)."""
        if not self.server.ucx:
            message = "this daemon serves no UCX (start it with --ucx)"
            return self._error("FAILED_PRECONDITION", message, True, "ucx")
        if self.wire == "ucx":
            return self._error("FAILED_PRECONDITION", "already on UCX", True, "ucx")
        from store.wire.ucx_transport import daemon_accept

        try:
            ucx, address = daemon_accept(meta, UCX_HANDSHAKE_TIMEOUT, self.server.listening)
        except ValueError as exc:
            return self._error("INVALID_ARGUMENT", str(exc), True, "ucx")
        try:
            send_frame(self.conn, m.UcxReply(address).to_wire())
        except BaseException:
            ucx.close()
            raise
        ucx.bootstrap, self.conn, self.wire = self.conn, ucx, "ucx"
        send_frame(self.conn, m.UcxReply().to_wire())
        ucx.settimeout(self.server.ucx_timeout)
        return True

    def _attach(self, meta: dict[str, Any]) -> None:
        attach = m.Attach.from_wire(meta)
        try:
            region = RegionFile.attach(attach.name, self.server.max_region_bytes)
        except RegionError as exc:
            raise BadRequest(str(exc)) from None
        if region.nonce != attach.nonce:
            region.close()
            raise BadRequest(m.NONCE_MISMATCH)
        if self.region is not None:
            self.region.close()
        self.region = region
        self.cma_pid, self.cma_at, self.ticket = None, attach.at, None
        self.cma_nonce = region.nonce  # as attached: later probes must find these bytes
        reply = m.AttachReply(region.size)
        door = self.server.same_host
        # Same host proven: the door opens; never for a salt-bound token, since through
        # it the client maps the whole shared pool, every tenant's chunks (auth.py).
        bound = self.grant is None or self.grant.salt_tag is not None
        if door is not None and self.wire == "stream" and not bound:
            reply.door = door.offer()
            self.ticket = reply.door["ticket"]
        send_frame(self.conn, reply.to_wire())

    def _cma(self, meta: dict[str, Any]) -> None:
        """May puts on this connection be read from the client's memory? Yes if the
        process that redeemed this session's ticket (pid and uid from the kernel) runs as
        this daemon's user and has the region's nonce where the client said it mapped
        the region (``at``). Never across users: a daemon running as root must not
        become a way to read other users' processes."""
        door = self.server.same_host
        peer = door.peer(self.ticket) if door is not None and self.region else None
        self.ticket = None
        self.cma_pid = None
        if peer is not None and self.region is not None and peer[1] == os.geteuid():
            self.cma_pid = probe_cma(peer[0], self.cma_at, self.cma_nonce)
        send_frame(self.conn, m.CmaReply(self.cma_pid is not None).to_wire())

    def window(self, offset: Any, length: Any) -> tuple[RegionFile, int, int]:
        """The region and the window (offset, length) in it that a request names."""
        if self.region is None:
            raise BadRequest("no shared-memory region attached on this connection")
        offset, length = m.check_window(offset, length, self.region.size)
        return self.region, offset, length

    def close(self) -> None:
        if self.wire == "ucx":
            self.conn.bootstrap = None  # the socket is the server's to close
            self.conn.close()
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self.region is not None:
            self.region.close()
            self.region = None
