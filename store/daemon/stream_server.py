"""The bulk-data port: get and put over a plain socket stream, or through shared memory.

One thread per connection (a client keeps one connection per concurrent caller). The
first frame must be ``hello`` (with the bearer token when one is configured). Then:

* ``attach`` maps the client's shared-memory region (store/shm.py) after checking the
  nonce at its start: proof that client and daemon share a host.
* ``get`` answers in parts: a frame listing hits (index, header[, offset]), then, on the
  socket path, their payloads; with ``region`` the payloads are in shared memory.
* ``put`` is one frame listing headers, then the payloads (or their region offsets).
  The whole request is read and checked before anything is stored.

Bad input gets an ``INVALID_ARGUMENT`` error frame. If payload bytes were left unread,
the daemon closes the connection after the error, since the stream is out of step.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from typing import Any

import numpy as np

from store.chunk import encode_prefix
from store.daemon.activity import Activity, Draining
from store.daemon.service import BadRequest, StoreService
from store.shm import NONCE_BYTES, Region, RegionError
from store.stream import PROTOCOL_VERSION, StreamClosed, recv_frame, recv_into, send_frame, tune

log = logging.getLogger(__name__)


class _OutOfStep(Exception):
    """Payload bytes of a refused request were not read: answer, then drop the connection."""


class StreamServer:
    """Accepts connections on ``host:port`` and serves each on its own thread."""

    def __init__(
        self,
        service: StoreService,
        activity: Activity,
        token: str | None,
        max_region_bytes: int = 1 << 34,
    ) -> None:
        self.service = service
        self.activity = activity
        self.token = token
        self.max_region_bytes = max_region_bytes
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self, host: str, port: int) -> int:
        """Listen and accept in a background thread; returns the bound port."""
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        threading.Thread(target=self._accept, name="kvstore-stream-accept", daemon=True).start()
        return self._listener.getsockname()[1]

    def stop(self) -> None:
        """Stop accepting and close every connection (call after draining)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for conn in self._conns:
                _shutdown(conn)

    def _accept(self) -> None:
        while (listener := self._listener) is not None:
            try:
                conn, peer = listener.accept()
            except OSError:
                return  # closed by stop()
            tune(conn)
            with self._lock:
                self._conns.add(conn)
            name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            threading.Thread(
                target=self._serve, args=(conn, name), name="kvstore-stream", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        session = _Session(self, conn, peer)
        try:
            while self._listener is not None:
                if not session.handle(recv_frame(conn)):
                    break
        except (StreamClosed, OSError):
            pass
        finally:
            session.close()
            with self._lock:
                self._conns.discard(conn)
            _shutdown(conn)
            conn.close()


class _Session:
    """State of one connection: authenticated or not, its client name, its region."""

    def __init__(self, server: StreamServer, conn: socket.socket, peer: str) -> None:
        self.server = server
        self.service = server.service
        self.activity = server.activity
        self.conn = conn
        self.client = peer
        self.authenticated = server.token is None
        self.region: Region | None = None
        self.staging = np.empty(0, dtype=np.uint8)

    def handle(self, meta: dict[str, Any]) -> bool:
        """Serve one request; False when the connection must close."""
        op = meta.get("op")
        try:
            if op == "hello":
                return self._hello(meta)
            if not self.authenticated:
                return self._error(
                    "UNAUTHENTICATED", "send hello with the bearer token first", False
                )
            handler = {"attach": self._attach, "get": self._get, "put": self._put}.get(op)
            if handler is None:
                return self._error("UNIMPLEMENTED", f"unknown op {str(op)[:40]!r}", True)
            with self.activity.request(self.client, op.capitalize(), self._transport(meta)):
                handler(meta)
            return True
        except BadRequest as exc:
            return self._error("INVALID_ARGUMENT", str(exc), True, op)
        except _OutOfStep as exc:
            return self._error("INVALID_ARGUMENT", str(exc), False, op)
        except Draining as exc:
            return self._error("UNAVAILABLE", str(exc), meta.get("op") != "put", op)

    def _transport(self, meta: dict[str, Any]) -> str:
        return "shm" if meta.get("region") else "stream"

    def _error(self, code: str, message: str, keep: bool, op: Any = None) -> bool:
        self.activity.errors.labels(str(op).capitalize()[:16], code).inc()
        send_frame(self.conn, {"error": code, "message": message})
        return keep

    def _hello(self, meta: dict[str, Any]) -> bool:
        token = self.server.token
        if token is not None:
            given = str(meta.get("token") or "").encode()
            if not hmac.compare_digest(given, token.encode()):
                return self._error(
                    "UNAUTHENTICATED", "missing or wrong bearer token", False, "hello"
                )
        self.authenticated = True
        if meta.get("client"):
            self.client = str(meta["client"])
        limits = self.service.limits
        send_frame(self.conn, {"ok": True, "version": PROTOCOL_VERSION,
                               "max_batch": limits.max_batch,
                               "max_chunk_bytes": limits.max_chunk_bytes,
                               "max_request_bytes": limits.max_request_bytes})  # fmt: skip
        return True

    def _attach(self, meta: dict[str, Any]) -> None:
        try:
            region = Region.attach(meta.get("name"), self.server.max_region_bytes)
        except RegionError as exc:
            raise BadRequest(str(exc)) from None
        if region.nonce != bytes(meta.get("nonce") or b""):
            region.close()
            raise BadRequest("region nonce does not match: not the same host or not this client's")
        if self.region is not None:
            self.region.close()
        self.region = region
        send_frame(self.conn, {"ok": True, "size": region.size})

    def _window(self, meta: dict[str, Any]) -> np.ndarray:
        if self.region is None:
            raise BadRequest("no shared-memory region attached on this connection")
        offset, length = meta.get("offset"), meta.get("length")
        if not (isinstance(offset, int) and isinstance(length, int)):
            raise BadRequest("region requests need integer offset and length")
        if offset < NONCE_BYTES or length < 0 or offset + length > self.region.size:
            raise BadRequest(
                f"window {offset}+{length} is outside the region of {self.region.size}"
            )
        return self.region.array[offset : offset + length]

    # -- get ------------------------------------------------------------------------
    def _get(self, meta: dict[str, Any]) -> None:
        keys, fp = meta.get("keys"), meta.get("fp") or None
        if not isinstance(keys, list):
            raise BadRequest("keys must be a list of strings")
        if meta.get("region"):
            return self._get_into(keys, fp, self._window(meta))
        sent = 0
        for part in self.service.get_parts(keys, fp):
            payloads = [p.payload for p in part]
            send_frame(self.conn, {"part": [[p.index, encode_prefix(p.header)] for p in part]},
                       *payloads)  # fmt: skip
            sent += sum(p.header.nbytes for p in part)
        self.activity.bytes.labels("out", "stream").inc(sent)
        send_frame(self.conn, {"ok": True, "done": len(keys)})

    def _get_into(self, keys: list[Any], fp: bytes | None, window: np.ndarray) -> None:
        sent = 0
        for item in self.service.get_into(keys, fp, window):
            if isinstance(item, int):
                send_frame(self.conn, {"ok": True, "done": item})
                break
            rows = [[p.index, encode_prefix(p.header), p.offset] for p in item]
            sent += sum(p.header.nbytes for p in item)
            send_frame(self.conn, {"part": rows})
        self.activity.bytes.labels("out", "shm").inc(sent)

    # -- put ------------------------------------------------------------------------
    def _put(self, meta: dict[str, Any]) -> None:
        rows, fp = meta.get("chunks"), meta.get("fp") or None
        region = bool(meta.get("region"))
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) >= 3 for r in rows):
            raise (BadRequest if region else _OutOfStep)(
                "put needs chunks: [[header, nbytes, block_hash, ...]]"
            )
        sizes = [r[1] if isinstance(r[1], int) and r[1] >= 0 else -1 for r in rows]
        try:
            if min(sizes, default=0) < 0:
                raise BadRequest("chunk sizes must be non-negative integers")
            self.service.check_put_size(len(rows), sum(sizes))
        except BadRequest as exc:
            raise (BadRequest if region else _OutOfStep)(str(exc)) from None
        payloads = self._region_payloads(meta, rows, sizes) if region else self._receive(sizes)
        chunks = [
            self.service.check_chunk(r[0], p, fp, r[2]) for r, p in zip(rows, payloads, strict=True)
        ]
        self.activity.bytes.labels("in", "shm" if region else "stream").inc(sum(sizes))
        send_frame(self.conn, {"ok": True, "stored": self.service.put(chunks)})

    def _receive(self, sizes: list[int]) -> list[np.ndarray]:
        """Read the payloads into this connection's staging buffer (reused across puts)."""
        total = sum(sizes)
        if self.staging.nbytes < total:
            self.staging = np.empty(total, dtype=np.uint8)
        recv_into(self.conn, memoryview(self.staging)[:total])
        bounds = np.cumsum([0, *sizes])
        return [self.staging[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def _region_payloads(
        self, meta: dict[str, Any], rows: list[list[Any]], sizes: list[int]
    ) -> list[np.ndarray]:
        window = self._window(meta)
        out = []
        for r, n in zip(rows, sizes, strict=True):
            off = r[3] if len(r) > 3 else None
            if not isinstance(off, int) or off < 0 or off + n > window.nbytes:
                raise BadRequest(f"payload at {off}+{n} is outside the window of {window.nbytes}")
            out.append(window[off : off + n])
        return out

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
