"""The bulk-data port: get and put over a plain socket stream, or through shared memory.

One thread per connection (a client keeps one connection per concurrent caller). The
first frame must be ``hello`` (with the bearer token when one is configured; its grant,
auth.py, then holds for the connection: PERMISSION_DENIED for what it lacks). Until
then a connection has a deadline and small frames, and connections are capped
(stream_gate.py). Then:

* ``ucx`` (with ``--ucx``) moves the connection onto UCX: store/wire/ucx_transport.py.
* ``attach`` maps the client's shared-memory region (store/wire/shm.py) after checking the
  nonce at its start: proof that client and daemon share a host.
* ``get`` answers in parts: a frame listing hits (index, header[, offset]), then, on the
  socket path, their payloads; with ``region`` the payloads are in shared memory: in the
  client's region, or (``pool``) where they lie in the daemon's cpu pool, which the
  client maps read-only (same_host.py), pinned until the client sends ``release``.
* ``cma`` asks whether puts may be read from the client's memory (store/wire/cma.py); the
  daemon answers from the pid the kernel gave for the client at its same-host door.
* ``put`` is one frame listing headers, then the payloads (or their region offsets).
  The whole request is read and checked before anything is stored.

Bad input gets an ``INVALID_ARGUMENT`` error frame. If payload bytes were left unread,
the daemon closes the connection after the error, since the stream is out of step.
"""

from __future__ import annotations

import logging
import os
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from kvcore.chunk import Chunk
from store.daemon.activity import Activity, Draining
from store.daemon.auth import OPEN, Authenticator, Grant, PermissionDenied, Visible
from store.daemon.service import IN_POOL, PART_BYTES, BadRequest, OverLimit, StoreService
from store.daemon.stream_gate import HELLO_LIMITS, StreamGate, request_limits
from store.wire import cma
from store.wire.put_frame import KEYS, OFFSETS
from store.wire.same_host import SameHost
from store.wire.shm import NONCE_BYTES, RegionError, RegionFile
from store.wire.stream import (
    PROTOCOL_VERSION,
    BadFrame,
    StreamClosed,
    recv_buffers,
    recv_exactly,
    recv_frame,
    send_frame,
)

log = logging.getLogger(__name__)


PUT_GROUP_BYTES = 1 << 20
"""A socket put is received and verified in groups of about this many bytes, all
on the connection's thread: the socket's own buffers keep the client sending meanwhile,
and a group hashes at ~18 GB/s right after it arrived, against ~14 for 4 MiB groups.
Measured against a helper thread storing 4 MiB groups while the next arrives (the
GIL serialised the two): stream put 2.94-3.14 → 3.60-3.68 GB/s at 1 MiB chunks."""

CMA_GROUP_BYTES = 4 << 20
"""A cross-memory-attach (or region) put is copied in groups of about this many bytes
while the helper thread verifies and stores the last group: there the copy is this
thread's own work (``process_vm_readv`` and ``preadv`` release the GIL), and doing both
on one thread measured 25% slower."""

BOUNCE_BYTES = 16 << 20
"""A region get's window is at most this (or the chunk limit, if larger): the payloads
pass through a private buffer of that size on their way into the client's region."""


RELEASE_TIMEOUT = 30.0
"""Seconds a client may take to copy a get's chunks out of the shared pool."""


HANDSHAKE_TIMEOUT = 10.0
"""Seconds the daemon gives a client to connect its end of a UCX connection."""


class _OutOfStep(Exception):
    """Payload bytes of a refused request were not read: answer, then drop the connection."""


class StreamServer:
    """Accepts connections on ``host:port`` and serves each on its own thread."""

    def __init__(
        self,
        service: StoreService,
        activity: Activity,
        auth: Authenticator | None,
        max_region_bytes: int = 1 << 34,
        ucx: bool = False,
        same_host: SameHost | None = None,
        max_connections: int = 1024,
        handshake_timeout: float = 5.0,
    ) -> None:
        self.service = service
        self.same_host = same_host  # pids of same-host clients, the shared pool (same_host.py)
        self.activity = activity
        self.auth = auth or Authenticator()  # no tokens: every connection is OPEN
        self.max_region_bytes = max_region_bytes
        self.ucx = ucx  # serve {"op": "ucx"}: connections move onto UCX (store/wire/ucx_transport.py)
        self.ucx_timeout: float | None = None  # idle UCX connections wait without a deadline
        self.release_timeout = RELEASE_TIMEOUT
        self._listener: socket.socket | None = None
        # the connection cap, hello deadlines and the accept loop (stream_gate.py)
        self.gate = StreamGate(max_connections, handshake_timeout,
                               lambda reason: activity.turned_away.labels(reason).inc())  # fmt: skip
        self.request_limits = request_limits(service.limits.max_batch)  # frames after hello

    def start(self, host: str, port: int) -> int:
        """Listen and accept in a background thread; returns the bound port."""
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.gate.start(self._listener, self._serve)
        return self._listener.getsockname()[1]

    def serving(self) -> bool:
        """Whether the port accepts connections (False once its accept loop ended)."""
        return self._listener is not None and self.gate.serving

    def stop(self) -> None:
        """Stop accepting and close every connection (call after draining)."""
        listener, self._listener = self._listener, None
        self.gate.close()
        if listener is not None:
            _shutdown(listener)  # wakes the accept loop
            listener.close()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        session = _Session(self, conn, peer)
        try:
            while self._listener is not None:
                if not session.handle(recv_frame(session.conn, session.limits)):  # or UCX
                    break
        except BadFrame as exc:  # out of step: say why, then hang up
            try:
                session.refuse(str(exc) if session.greeted else f"{exc} (before hello)")
            except (StreamClosed, OSError):
                pass
        except (StreamClosed, OSError):
            pass
        finally:
            session.close()
            self.gate.leave(conn)
            _shutdown(conn)
            conn.close()


class _Session:
    """State of one connection: its grant (None until authenticated), its client name,
    its region."""

    def __init__(self, server: StreamServer, conn: socket.socket, peer: str) -> None:
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
        self.cma_at: Any = None  # where the client says it has the region mapped
        self.cma_nonce = b""  # the region's nonce at attach
        self.ticket: str | None = None  # this session's ticket at the same-host door
        self.staging = np.empty(0, dtype=np.uint8)  # a put's payloads (stream path)
        self.out_bufs = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]  # gets
        self.bounce = np.empty(0, dtype=np.uint8)  # region gets, on their way to the region
        self._io: ThreadPoolExecutor | None = None

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
            handler = {"attach": self._attach, "cma": self._cma, "get": self._get,
                       "put": self._put}.get(op) if type(op) is str else None  # fmt: skip
            if handler is None:
                ops = "hello, attach, cma, get, put"
                return self._error(
                    "INVALID_ARGUMENT", f"unknown op {str(op)[:40]!r} (the stream has {ops})", True
                )
            with self.activity.request(self.client, op.capitalize(), self._transport(meta)):
                handler(meta)
            return True
        except BadRequest as exc:
            return self._error("INVALID_ARGUMENT", str(exc), True, op)
        except _OutOfStep as exc:
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
        send_frame(self.conn, {"error": code, "message": message})
        return keep

    def _greeted(self) -> bool:
        """After a successful hello: lift the deadline, allow request-sized frames.
        False (hang up) if the deadline had passed already."""
        if not self.greeted:
            self.greeted = self.server.gate.greeted(self.conn)
            self.limits = self.server.request_limits
        return self.greeted

    def _hello(self, meta: dict[str, Any]) -> bool:
        token = meta.get("token")
        grant = self.server.auth.grant(token if isinstance(token, (str, bytes)) else None)
        if grant is None:
            return self._error("UNAUTHENTICATED", "missing or wrong bearer token", False, "hello")
        self.grant = grant
        if meta.get("client"):
            self.client = str(meta["client"])
        limits = self.service.limits
        send_frame(self.conn, {"ok": True, "version": PROTOCOL_VERSION,
                               "max_batch": limits.max_batch,
                               "max_chunk_bytes": limits.max_chunk_bytes,
                               "max_request_bytes": limits.max_request_bytes})  # fmt: skip
        return True

    def _ucx(self, meta: dict[str, Any]) -> bool:
        """Move this connection onto UCX (store/wire/ucx_transport.py has the handshake)."""
        if not self.server.ucx:
            return self._error(
                "FAILED_PRECONDITION",
                "this daemon serves no UCX (start it with --ucx)",
                True,
                "ucx",
            )
        if self.wire == "ucx":
            return self._error("FAILED_PRECONDITION", "already on UCX", True, "ucx")
        from store.wire.ucx_transport import daemon_accept

        try:
            ucx, address = daemon_accept(
                meta, HANDSHAKE_TIMEOUT, lambda: self.server._listener is not None
            )
        except ValueError as exc:
            return self._error("INVALID_ARGUMENT", str(exc), True, "ucx")
        try:
            send_frame(self.conn, {"ok": True, "address": address})
        except BaseException:
            ucx.close()
            raise
        ucx.bootstrap, self.conn, self.wire = self.conn, ucx, "ucx"
        send_frame(self.conn, {"ok": True, "ucx": True})
        ucx.settimeout(self.server.ucx_timeout)
        return True

    def _attach(self, meta: dict[str, Any]) -> None:
        try:
            region = RegionFile.attach(meta.get("name"), self.server.max_region_bytes)
        except RegionError as exc:
            raise BadRequest(str(exc)) from None
        if region.nonce != bytes(meta.get("nonce") or b""):
            region.close()
            raise BadRequest("region nonce does not match: not the same host or not this client's")
        if self.region is not None:
            self.region.close()
        self.region = region
        self.cma_pid, self.cma_at, self.ticket = None, meta.get("at"), None
        self.cma_nonce = region.nonce  # as attached: later probes must find these bytes
        reply: dict[str, Any] = {"ok": True, "size": region.size}
        door = self.server.same_host
        # Same host proven: the door opens; never for a salt-bound token, since through
        # it the client maps the whole shared pool, every tenant's chunks (auth.py).
        bound = self.grant is None or self.grant.salt_tag is not None
        if door is not None and self.wire == "stream" and not bound:
            offer = door.offer()
            self.ticket = offer["ticket"]
            reply["door"] = offer
        send_frame(self.conn, reply)

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
            self.cma_pid = _probe_cma(peer[0], self.cma_at, self.cma_nonce)
        send_frame(self.conn, {"ok": True, "cma": self.cma_pid is not None})

    def _window(self, meta: dict[str, Any]) -> tuple[RegionFile, int, int]:
        """The region and the window (offset, length) in it that a request names."""
        if self.region is None:
            raise BadRequest("no shared-memory region attached on this connection")
        offset, length = meta.get("offset"), meta.get("length")
        if not (type(offset) is int and type(length) is int):
            raise BadRequest("region requests need integer offset and length")
        if offset < NONCE_BYTES or length < 0 or offset + length > self.region.size:
            raise BadRequest(
                f"window {offset}+{length} is outside the region of {self.region.size}"
            )
        return self.region, offset, length

    # -- get ------------------------------------------------------------------------
    def _get(self, meta: dict[str, Any]) -> None:
        keys, fp = meta.get("keys"), meta.get("fp") or None
        if not isinstance(keys, list):
            raise BadRequest("keys must be a list of strings")
        seen = self._visible(keys)  # a salt-bound grant's get misses other salts' keys
        if meta.get("region"):
            return self._get_into(meta, seen, fp)
        keys = self.service.check_keys(seen.keys)
        parts = self.service.plan_parts(keys)
        encode = self.service.prefixes.encode
        sent = 0
        pending: Future | None = None
        give_back = self.service.store.give_back
        try:
            if parts:
                pending = self.io().submit(self._fetch, keys, parts[0], fp, 0)
            for i in range(len(parts)):
                assert pending is not None
                placed, lent = pending.result()
                pending = None
                try:
                    if i + 1 < len(parts):  # fetch the next part into the other buffer meanwhile
                        pending = self.io().submit(self._fetch, keys, parts[i + 1], fp, (i + 1) % 2)
                    rows = [[p.index, encode(p.header)] for p in placed]
                    seen.reposition(rows)  # (a salt-bound grant's get)
                    send_frame(self.conn, {"part": rows}, *_buffers(placed))
                    sent += sum(p.header.nbytes for p in placed)
                finally:  # sent (or failed): the lent pages may be reused
                    give_back(lent)
        finally:
            if pending is not None:  # the send failed: let the fetch finish with the buffer
                if pending.exception() is None:
                    give_back(pending.result()[1])
        self.activity.bytes.labels("out", self.wire).inc(sent)
        send_frame(self.conn, {"ok": True, "done": seen.total})

    def _visible(self, keys: list[Any]) -> Visible:
        """The keys of a get this connection's grant may see (checked, when it is bound
        to a salt; the service checks them otherwise)."""
        if self.grant is None or self.grant.salt_tag is None:
            return Visible(keys, None, len(keys))
        return self.grant.visible(self.service.check_keys(keys))

    def _fetch(
        self, keys: list[str], span: tuple[int, int], fp: Any, slot: int
    ) -> tuple[list[Any], list[str]]:
        def buffer(nbytes: int) -> np.ndarray:
            if self.out_bufs[slot].nbytes < nbytes:
                self.out_bufs[slot] = np.empty(max(nbytes, PART_BYTES), dtype=np.uint8)
            return self.out_bufs[slot]

        return self.service.fetch_part(keys, span, fp, buffer)

    def _get_into(self, meta: dict[str, Any], seen: Visible, fp: bytes | None) -> None:
        """The shared-memory get: the helper thread copies part *n+1* from the tiers into
        the window while this thread announces part *n* (and the client copies it out).

        A client that maps the shared pool (``"pool": true``) is instead told where first-
        tier hits lie in the pool; their pages stay pinned until it says ``release``."""
        region, base, length = self._window(meta)
        # Payloads go through a private buffer (the region is never mapped here: shm.py),
        # at most this large a window per request; the client asks again for the rest.
        length = min(length, max(BOUNCE_BYTES, self.service.limits.max_chunk_bytes))
        if self.bounce.nbytes < length:
            self.bounce = np.empty(length, dtype=np.uint8)
        window = self.bounce[:length]
        encode = self.service.prefixes.encode
        sent = 0
        door = self.server.same_host
        lent: list[str] | None = [] if meta.get("pool") and door and door.nbytes else None
        parts = self.service.get_into(seen.keys, fp, window, lent, door.nbytes // 4 if door else 0)
        pending: Future | None = self.io().submit(next, parts, None)
        try:
            while pending is not None:
                item = pending.result()
                pending = None
                if item is None or isinstance(item, int):
                    done = seen.done(item or 0)
                    send_frame(self.conn, {"ok": True, "done": done, "release": bool(lent)})
                    break
                pending = self.io().submit(next, parts, None)
                _flush(region, base, window, item)
                rows = [
                    [p.index, encode(p.header), p.offset]
                    if p.offset != IN_POOL
                    else [p.index, encode(p.header), IN_POOL, [x for run in p.payload for x in run]]
                    for p in item
                ]
                seen.reposition(rows)  # (a salt-bound grant's get)
                sent += sum(p.header.nbytes for p in item)
                send_frame(self.conn, {"part": rows})
            if lent:
                self._await_release()
        finally:
            if pending is not None:
                pending.exception()
            parts.close()
            if lent:
                self.service.store.give_back(lent)
        self.activity.bytes.labels("out", "shm").inc(sent)

    def _await_release(self) -> None:
        """Wait for the client to say it has copied the lent chunks out of the pool, and
        confirm. A client that does not within RELEASE_TIMEOUT loses its connection, so
        its pins cannot outlive it, and never gets the confirmation its copies need."""
        self.conn.settimeout(self.server.release_timeout)
        try:
            meta = recv_frame(self.conn, self.limits)
        except TimeoutError:
            raise StreamClosed("no release of lent pool pages in time") from None
        finally:
            self.conn.settimeout(None)
        if meta.get("op") != "release":
            raise StreamClosed(f"expected release of lent pool pages, got {meta.get('op')!r}")
        # The pages were still pinned when the release came: the client's copies are
        # good. A client that hears nothing (the timeout dropped it) discards them.
        send_frame(self.conn, {"ok": True, "released": True})

    # -- put ------------------------------------------------------------------------
    def _put(self, meta: dict[str, Any]) -> None:
        groups, fp = meta.get("chunks"), meta.get("fp") or None
        cma = meta.get("cma")  # payload addresses in the client's memory (store/wire/cma.py)
        region = bool(meta.get("region"))
        inline = not region and cma is None  # payload bytes follow on the stream
        try:
            sizes = self.service.put_sizes(groups, region)
        except OverLimit as exc:
            if inline:
                self._discard(exc.nbytes)  # keep the stream in step
            raise BadRequest(str(exc)) from None
        except BadRequest as exc:  # inline: no telling how many bytes follow, so hang up
            raise (_OutOfStep if inline else BadRequest)(str(exc)) from None
        try:  # may this token write, and these keys (auth.py)? Else nothing is stored
            self._authorize_put(groups)
        except PermissionDenied:
            if inline:
                self._discard(sum(sizes))  # keep the stream in step
            raise
        try:  # every header before any payload: a bad one costs no store work
            headers = self.service.check_groups(groups, fp)
        except BadRequest:
            if inline:
                self._discard(sum(sizes))  # keep the stream in step
            raise
        if cma is not None:
            stored = self._receive_and_store(headers, sizes, self._cma_source(cma, sizes))
        elif region:
            stored = self._receive_and_store(headers, sizes, self._region_source(meta, groups, sizes))
        else:
            stored = self._receive_and_store(headers, sizes)
        self.activity.bytes.labels("in", self.wire if inline else "shm").inc(sum(sizes))
        send_frame(self.conn, {"ok": True, "stored": stored})

    def _authorize_put(self, groups: list[list[Any]]) -> None:
        grant = self.grant
        if grant is None:  # (handle lets no unauthenticated request this far)
            raise PermissionDenied("send hello with the bearer token first")
        grant.check("Put")
        if grant.salt_tag is not None:
            for g in groups:
                grant.check_own(g[KEYS], "Put")

    def _cma_source(self, addrs: Any, sizes: list[int]) -> Any:
        """A ``fill`` for ``_receive_and_store`` that copies chunk ``i``'s payload from
        ``addrs[i]`` in the client's memory (a connection whose attach proved it may)."""
        pid = self.cma_pid
        # The nonce again, before every put: the pid must still be the client's process
        # (not a reused pid, not the image of an exec).
        if (
            pid is None
            or self.region is None
            or _probe_cma(pid, self.cma_at, self.cma_nonce) is None
        ):
            self.cma_pid = None
            raise BadRequest(f"{cma.REFUSED} (this connection may not; send payloads instead)")
        if not isinstance(addrs, list) or len(addrs) != len(sizes):
            raise BadRequest("cma needs one payload address per chunk")
        if not all(type(a) is int and 0 <= a < 1 << 64 for a in addrs):
            raise BadRequest("payload addresses must be non-negative integers")

        def fill(start: int, end: int, buffers: list[Any]) -> None:
            remote = [(addrs[i], sizes[i]) for i in range(start, end)]
            try:
                cma.read(pid, buffers, remote)
            except OSError:  # one message for every cause: no oracle on the memory
                raise BadRequest(cma.REFUSED) from None

        return fill

    def _receive_and_store(
        self, headers: list[Any], sizes: list[int], fill: Any = None
    ) -> list[bool]:
        """Read the payloads in groups (from the socket, or by ``fill(start, end,
        buffers)``: chunks ``start:end`` into ``buffers``) and verify each group: on this
        thread for the socket, on the helper thread while the next group is copied for
        ``fill``. Chunks the first tier can reserve (``TieredStore.reserve``) are received
        straight into its pages; the rest go through this connection's staging buffer
        (reused across puts). Once every payload is verified, all are published at once
        (``commit``, ``put``): if one fails its checksum, nothing of the request was
        stored, its reserved pages are freed, and the request is refused."""
        store = self.service.store
        inline = fill is None  # see PUT_GROUP_BYTES and CMA_GROUP_BYTES
        group_bytes = PUT_GROUP_BYTES if inline else CMA_GROUP_BYTES
        places = store.reserve(headers)
        staged = sum(n for n, p in zip(sizes, places, strict=True) if p is None)
        if self.staging.nbytes < staged:
            self.staging = np.empty(staged, dtype=np.uint8)
        view = memoryview(self.staging)
        payloads: list[Any] = []
        checks: list[Future] = []  # the helper's verification of each group (fill)
        published = False
        start = pos = 0
        try:
            while start < len(sizes):
                end, nbytes = start, 0
                while end < len(sizes) and (end == start or nbytes < group_bytes):
                    nbytes += sizes[end]
                    end += 1
                for n, place in zip(sizes[start:end], places[start:end], strict=True):
                    if place is None:
                        payloads.append(view[pos : pos + n])
                        pos += n
                    else:
                        payloads.append(place)
                group = payloads[start:end]
                buffers = [  # pool pages and staging slices are byte views already
                    b if type(b) is memoryview and b.format == "B" else memoryview(b).cast("B")
                    for b in _flat(group)
                ]
                if inline:
                    recv_buffers(self.conn, buffers)
                    try:
                        self.service.verify_payloads(headers[start:end], group)
                    except BadRequest:  # refused: read the rest only to keep the stream in step
                        self._discard(sum(sizes[end:]))
                        raise
                else:
                    fill(start, end, buffers)
                    verify = self.service.verify_payloads
                    checks.append(self.io().submit(verify, headers[start:end], group))
                start = end
            for check in checks:
                check.result()
            stored = self._publish(headers, payloads, places)
            published = True
            return stored
        finally:
            for check in checks:  # nothing may still read these pages after this
                check.exception()
            if not published and any(p is not None for p in places):
                store.commit(headers, [False] * len(headers))  # free the reserved pages

    def _publish(self, headers: list[Any], payloads: list[Any], places: list[Any]) -> list[bool]:
        """Publish the verified chunks of a put: commit the reserved ones, put the others;
        per chunk, whether it is stored."""
        mine = [i for i, p in enumerate(places) if p is None]
        lent = [i for i, p in enumerate(places) if p is not None]
        for i in lent:  # (``put`` records the sizes of the others)
            self.service.sizes.add(headers[i].key, headers[i].nbytes)
        if not mine:  # every chunk in reserved pages: the common case
            return self.service.store.commit(headers, [True] * len(headers))
        stored = [False] * len(headers)
        chunks = [Chunk(headers[i], payloads[i]) for i in mine]
        for i, ok in zip(mine, self.service.put(chunks), strict=True):
            stored[i] = ok
        if lent:
            got = self.service.store.commit([headers[i] for i in lent], [True] * len(lent))
            for i, ok in zip(lent, got, strict=True):
                stored[i] = ok
        return stored

    def _discard(self, nbytes: int) -> None:
        """Read and drop ``nbytes`` payload bytes of a refused put."""
        scratch = memoryview(bytearray(min(nbytes, 1 << 20)))
        while nbytes:
            n = min(nbytes, scratch.nbytes)
            recv_exactly(self.conn, scratch[:n])
            nbytes -= n

    def _region_source(self, meta: dict[str, Any], groups: list[list[Any]], sizes: list[int]) -> Any:
        """A ``fill`` for ``_receive_and_store`` that reads chunk ``i``'s payload from its
        offset in the window of the client's region."""
        region, base, length = self._window(meta)
        offsets = [off for g in groups for off in g[OFFSETS]]
        for off, n in zip(offsets, sizes, strict=True):
            if type(off) is not int or off < 0 or off + n > length:
                raise BadRequest(f"payload at {off}+{n} is outside the window of {length}")

        def fill(start: int, end: int, buffers: list[Any]) -> None:
            views = iter(buffers)
            for off, n in zip(offsets[start:end], sizes[start:end], strict=True):
                mine, got = [], 0
                while got < n:  # this chunk's buffers: one staging slice or its pages
                    mine.append(next(views))
                    got += mine[-1].nbytes
                try:
                    region.read(base + off, mine)
                except RegionError as exc:
                    raise BadRequest(str(exc)) from None

        return fill

    def close(self) -> None:
        if self.wire == "ucx":
            self.conn.bootstrap = None  # the socket is _serve's to close
            self.conn.close()
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self.region is not None:
            self.region.close()
            self.region = None


def _flat(payloads: list[Any]) -> list[Any]:
    """Buffers of ``payloads`` in order: a reserved chunk's payload is a list of page views."""
    out: list[Any] = []
    for p in payloads:
        if isinstance(p, list):
            out += p
        else:
            out.append(p)
    return out


def _buffers(placed: list[Any]) -> list[Any]:
    """The payload buffers of ``placed``, in order: lent hits are lists of page views."""
    return _flat([p.payload for p in placed])


def _flush(region: RegionFile, base: int, window: np.ndarray, placed: list[Any]) -> None:
    """Write the payloads of a get's part from ``window`` (the private buffer) to the
    same place in the client's region (``base`` + their offsets)."""
    spans = [(p.offset, p.offset + p.header.nbytes) for p in placed if p.offset != IN_POOL]
    if spans:
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        try:
            region.write(base + lo, [window[lo:hi]])
        except RegionError as exc:
            raise BadRequest(str(exc)) from None


def _probe_cma(pid: int, at: Any, nonce: bytes) -> int | None:
    """``pid`` if this process can read its memory and finds the region's nonce at
    ``at`` there (so it is the client that mapped the region), else None."""
    if not (type(at) is int and at > 0 and cma.available()):
        return None
    probe = bytearray(NONCE_BYTES)
    try:
        cma.read(pid, [probe], [(at, NONCE_BYTES)])
    except (OSError, ValueError):
        return None
    return pid if bytes(probe) == nonce else None


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
