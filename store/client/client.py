"""Client of a ``kvstore serve`` daemon: gRPC for control, a socket stream or shared memory
for bulk data.

``transport`` chooses the bulk path of ``get`` and ``put``:

* ``shm`` (same host only): gets copy first-tier hits out of the daemon's shared pool,
  mapped read-only; the daemon reads puts out of this process (cross-memory attach)
  where permitted; anything else crosses a shared-memory region;
* ``stream``: payloads on the daemon's stream port, straight into the caller's buffers;
* ``grpc``: payloads inline in gRPC messages (slowest; what other languages would use);
* ``ucx``: the stream's frames and payloads over UCX (RDMA, NVLink, ...; needs ucxx and a
  daemon started with ``--ucx``; store/wire/ucx_transport.py);
* ``auto`` (default): ``shm`` when the daemon can map this client's region, else ``stream``.

Every blocking step has a deadline (``timeout``). Errors surface as ``RemoteError``
(a gRPC status name and message) or ``OSError``; backends/remote.py turns them into
misses. Thread-safe: each concurrent caller borrows its own stream connection.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grpc
import numpy as np

from kvcore.buffers import flat_bytes, host_array
from kvcore.chunk import Chunk, ChunkError, decode_header, encode_prefix, host_view, on_device
from kvcore.shared_memory import PoolMapping
from store.wire import cma
from store.wire.proto import kvstore_pb2 as pb
from store.wire.proto import kvstore_pb2_grpc as pb_grpc
from store.wire.put_frame import put_groups
from store.wire.same_host import redeem
from store.wire.shm import Region
from store.wire.stream import RemoteError, check_reply, recv_buffers, recv_frame, send_frame, tune

TRANSPORTS = ("auto", "shm", "stream", "grpc", "ucx")
DEFAULT_PORT = 50051
IN_POOL = -1  # a get row's offset when the payload is read from the daemon's shared pool
WINDOW_START = 64  # payloads in a region start past the nonce, cache-line aligned
MAX_REGION_BYTES = 1 << 30
_HEADER_CACHE = 1 << 16
_headers: dict[bytes, Any] = {}
"""Headers of recent hits by their exact bytes: parsing one (msgpack, then a dataclass)
costs about as much as receiving 16 KiB, and the same chunks are read again and again.
Equal bytes parse to the same immutable header, so a hit is never stale."""


class Address(NamedTuple):
    host: str
    port: int


def parse_url(url: str) -> Address:
    """``kvstore://host:port`` (port defaults to 50051; IPv6 hosts in brackets)."""
    scheme, sep, rest = url.partition("://")
    if scheme != "kvstore" or not sep or not rest or "/" in rest.rstrip("/"):
        raise ValueError(f"daemon url {url!r}: expected kvstore://host:port")
    rest = rest.rstrip("/")
    host, port = rest, str(DEFAULT_PORT)
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":") or port
    elif ":" in rest:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"daemon url {url!r}: expected kvstore://host:port")
    return Address(host, int(port))


class _Conn:
    """One stream connection, optionally with a shared-memory region attached."""

    def __init__(
        self, sock: Any, region: Region | None, ucx: bool = False, pool: Any = None
    ) -> None:
        self.sock = sock  # a socket, or a UcxSocket (store/wire/ucx_transport.py)
        self.region = region
        self.ucx = ucx
        self.pool: PoolMapping | None = pool  # the daemon's shared cpu pool, read-only
        self.pid = os.getpid()  # a forked child must not use its parent's connections

    @property
    def cma(self) -> bool:
        """Whether the daemon reads this connection's put payloads from our memory."""
        return self.region is not None and self.region.cma

    def close(self) -> None:
        self.sock.close()
        if self.region is not None:
            self.region.close()


class KVStoreClient:
    """A connection to the daemon at ``url``; see the module docstring."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        transport: str = "auto",
        client_name: str | None = None,
        region_bytes: int = 64 << 20,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        if transport == "ucx":
            from store.wire.ucx_transport import load

            load()  # not installed: say so now, not as a miss per request
        self.address = parse_url(url)
        self.url = url
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.transport = transport
        self.region_bytes = region_bytes
        name = client_name or f"{socket.gethostname()}:{os.getpid()}"
        self._metadata = [("x-kvstore-client", name)]
        self._name = name
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        host = f"[{self.address.host}]" if ":" in self.address.host else self.address.host
        self._channel = grpc.insecure_channel(
            f"{host}:{self.address.port}",
            options=[("grpc.max_receive_message_length", 1 << 30),
                     ("grpc.max_send_message_length", 1 << 30),
                     ("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 2000)],
        )  # fmt: skip
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._stream_port: int | None = None
        self._shm_ok: bool | None = None if transport in ("auto", "shm") else False
        self._limits: dict[str, int] = {}
        self._pools: dict[str, PoolMapping] = {}

    # -- control (gRPC) -------------------------------------------------------------
    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _remote_error(exc) from None

    def health(self, timeout: float | None = None) -> pb.HealthReply:
        reply = self._call("Health", pb.HealthRequest(), timeout or self.connect_timeout)
        self._stream_port = reply.stream_port
        if reply.max_batch and reply.max_request_bytes:  # 0: a daemon that does not say
            self._limits = {"max_batch": reply.max_batch,
                            "max_request_bytes": reply.max_request_bytes}  # fmt: skip
        return reply

    def lookup(self, keys: Sequence[str]) -> list[str]:
        """The tier holding each leading stored key (its length is the stored prefix)."""
        return list(self._call("Lookup", pb.LookupRequest(keys=list(keys))).tiers)

    def delete(self, keys: Sequence[str]) -> int:
        return self._call("Delete", pb.DeleteRequest(keys=list(keys))).removed

    def stats(self) -> pb.StatsReply:
        return self._call("Stats", pb.StatsRequest())

    # -- bulk -----------------------------------------------------------------------
    def put(
        self,
        chunks: Sequence[Chunk],
        fingerprint: bytes | None = None,
        transport: str | None = None,
    ) -> list[bool]:
        """Store chunks; per chunk whether the daemon holds it. Bad input: RemoteError."""
        transport = transport or self.transport
        if not self._limits and chunks:  # split as the daemon allows from the first put on
            self.health()
        if transport == "grpc":
            return self._grpc_put(chunks, fingerprint)
        out: list[bool] = []
        for group in self._put_groups(chunks):
            out += self._on_conn(transport, self._shm_put, self._stream_put, group, fingerprint)
        return out

    def get(
        self,
        keys: Sequence[str],
        outs: Sequence[Any] | None = None,
        fingerprint: bytes | None = None,
        transport: str | None = None,
    ) -> list[Chunk | None]:
        """Each key's chunk or None; payloads land in ``outs[i]`` where given and large
        enough (host buffers; device tensors are filled through a host copy)."""
        transport = transport or self.transport
        results: list[Chunk | None] = [None] * len(keys)
        if not keys:
            return results
        if transport == "grpc":
            self._grpc_get(list(keys), outs, fingerprint, results)
            return results
        self._on_conn(
            transport, self._shm_get, self._stream_get, list(keys), outs, fingerprint, results
        )
        return results

    def _on_conn(self, transport: str, shm: Any, stream: Any, *args: Any) -> Any:
        """``shm(conn, *args)`` or ``stream(conn, *args)`` on a borrowed connection.

        A pooled connection may be dead (the daemon restarted): a failure to even send on
        one that was idle is retried once on a fresh connection. Gets and puts are
        idempotent (keys name content), so a retry never stores anything twice."""
        for attempt in (0, 1):
            reused = bool(self._idle)
            try:
                with self._borrow(transport) as conn:
                    run = shm if conn.region is not None and transport != "stream" else stream
                    return run(conn, *args)
            except (ConnectionError, BrokenPipeError) as exc:
                if attempt or not reused or isinstance(exc, TimeoutError):
                    raise
                with self._lock:
                    stale, self._idle = self._idle, []
                for conn in stale:
                    conn.close()
        raise AssertionError("unreachable")

    # -- stream path ----------------------------------------------------------------
    def _stream_get(self, conn: _Conn, keys: list[str], outs: Any, fp: Any, results: Any) -> None:
        send_frame(conn.sock, {"op": "get", "keys": keys, "fp": fp})
        for meta in _replies(conn.sock):
            part = [(index, _header(raw, index, len(keys))) for index, raw in meta.get("part", ())]
            places = [_destination(outs, index, h.nbytes) for index, h in part]
            recv_buffers(conn.sock, [memoryview(dst) for dst, _ in places])  # one scattered read
            for (index, header), (dst, final) in zip(part, places, strict=True):
                results[index] = Chunk(header, _deliver(dst, final, header.nbytes))

    def _stream_put(self, conn: _Conn, chunks: Sequence[Chunk], fp: Any) -> list[bool]:
        views = [host_view(c.payload) for c in chunks]  # sizes as sent, whatever headers say
        groups = put_groups(chunks, [v.nbytes for v in views])
        send_frame(conn.sock, {"op": "put", "fp": fp, "chunks": groups}, *views)
        return list(check_reply(recv_frame(conn.sock))["stored"])

    # -- shared-memory path ---------------------------------------------------------
    def _shm_get(self, conn: _Conn, keys: list[str], outs: Any, fp: Any, results: list) -> None:
        start = 0
        while start < len(keys):
            region = conn.region
            assert region is not None
            send_frame(conn.sock, {"op": "get", "keys": keys[start:], "fp": fp, "region": True,
                                   "offset": WINDOW_START, "length": region.size - WINDOW_START,
                                   "pool": conn.pool is not None})  # fmt: skip
            done = 0
            for meta in _replies(conn.sock):
                if "part" not in meta:
                    done = meta["done"]
                    if meta.get("release"):  # copied out of the pool: its pages may go
                        send_frame(conn.sock, {"op": "release"})
                        # Only the daemon's answer shows the pages were still pinned
                        # while we copied (a stall past its timeout loses the
                        # connection instead, and this get fails: no stale bytes).
                        check_reply(recv_frame(conn.sock))
                    break
                for row in meta["part"]:
                    index, offset = row[0], row[2]
                    header = _header(row[1], index, len(keys) - start)
                    dst, final = _destination(outs, start + index, header.nbytes)
                    if offset == IN_POOL:
                        if conn.pool is None or not conn.pool.read(row[3], dst):
                            raise RemoteError("INTERNAL", "daemon named pool pages out of range")
                    else:
                        src = region.array[
                            WINDOW_START + offset : WINDOW_START + offset + header.nbytes
                        ]
                        if src.nbytes != header.nbytes:
                            raise RemoteError(
                                "INTERNAL", "daemon placed a payload outside the region"
                            )
                        np.copyto(dst, src)
                    results[start + index] = Chunk(header, _deliver(dst, final, header.nbytes))
            if done == 0:  # the next payload does not fit: a bigger region, or the socket
                if not self._grow(conn, 2 * region.size):
                    self._stream_get(
                        conn, keys[start:], _tail(outs, start), fp, _Offset(results, start)
                    )
                    return
            start += done

    def _shm_put(self, conn: _Conn, chunks: Sequence[Chunk], fp: Any) -> list[bool]:
        if conn.cma:  # the daemon copies each payload straight out of this process
            views = [host_view(c.payload) for c in chunks]  # alive until the answer
            groups = put_groups(chunks, [v.nbytes for v in views])
            addrs = [cma.address(v) for v in views]
            send_frame(conn.sock, {"op": "put", "fp": fp, "chunks": groups, "cma": addrs})
            try:
                return list(check_reply(recv_frame(conn.sock))["stored"])
            except RemoteError as exc:
                # Memory the daemon cannot read (device-mapped or RDMA-registered
                # buffers, a process made undumpable): send the payloads instead, from now on.
                if exc.code != "INVALID_ARGUMENT" or cma.REFUSED not in exc.message:
                    raise
                assert conn.region is not None
                conn.region.cma = False
        need = WINDOW_START + sum(_aligned(host_view(c.payload).nbytes) for c in chunks)
        if conn.region is None or (need > conn.region.size and not self._grow(conn, need)):
            return self._stream_put(conn, chunks, fp)
        region = conn.region
        sizes, offsets, pos = [], [], 0
        for c in chunks:
            view = host_view(c.payload)
            n = view.nbytes
            np.copyto(region.array[WINDOW_START + pos : WINDOW_START + pos + n], host_array(view))
            sizes.append(n)
            offsets.append(pos)
            pos += _aligned(n)
        groups = put_groups(chunks, sizes, offsets)
        send_frame(conn.sock, {"op": "put", "fp": fp, "chunks": groups, "region": True,
                               "offset": WINDOW_START, "length": region.size - WINDOW_START})  # fmt: skip
        return list(check_reply(recv_frame(conn.sock))["stored"])

    def _grow(self, conn: _Conn, size: int) -> bool:
        """Replace the connection's region by one of at least ``size`` bytes."""
        size = max(size, 2 * (conn.region.size if conn.region else 0))
        if size > MAX_REGION_BYTES:
            return False
        region, _ = self._attach(conn.sock, size)
        if region is None:
            return False
        if conn.region is not None:
            conn.region.close()
        conn.region = region
        return True

    def _attach(self, sock: socket.socket, size: int) -> tuple[Region | None, Any]:
        """A region the daemon has mapped, or None if it cannot (another host); and this
        client's mapping of the daemon's shared pool, when it has one. Then, at the
        daemon's same-host door (store/wire/same_host.py), this process shows who it
        is, so the daemon may read its puts from its memory (``region.cma``)."""
        region = Region.create(size)
        try:
            send_frame(sock, {"op": "attach", "name": region.name, "nonce": region.nonce,
                              "at": cma.address(region.array)})  # fmt: skip
            reply = check_reply(recv_frame(sock))
        except RemoteError as exc:
            region.close()
            if exc.code != "INVALID_ARGUMENT":
                raise
            self._shm_ok = False
            return None, None
        finally:
            region.unlink()  # both sides have it mapped (or it failed): the name can go
        offer = reply.get("door")
        if not isinstance(offer, dict):
            return region, None
        came_in, fd = redeem(offer, self.connect_timeout)
        pool = self._pool(offer, fd)
        if came_in and cma.available():
            send_frame(sock, {"op": "cma"})
            region.cma = bool(check_reply(recv_frame(sock)).get("cma"))
        return region, pool

    def _pool(self, offer: dict[str, Any], fd: int | None) -> PoolMapping | None:
        """This client's read-only mapping of the daemon's shared cpu pool, mapped once
        per daemon (``fd``, when the door handed one over, is closed here)."""
        name, size = offer.get("socket"), offer.get("size")
        try:
            with self._lock:
                if name in self._pools:
                    return self._pools[name]
            if fd is None or not isinstance(size, int) or size <= 0:
                return None
            try:
                mapping = PoolMapping(fd, size)
            except (OSError, ValueError):
                return None
            with self._lock:  # another thread may have mapped it meanwhile: keep one
                if name in self._pools:
                    return self._pools[name]
                self._pools = {name: mapping}  # a restarted daemon has a new pool: drop the old
            return mapping
        finally:
            if fd is not None:
                os.close(fd)

    # -- gRPC path ------------------------------------------------------------------
    def _grpc_put(self, chunks: Sequence[Chunk], fp: bytes | None) -> list[bool]:
        """One client-streamed Put per request-sized group, one message per chunk."""
        out: list[bool] = []
        for group in self._put_groups(chunks):
            msgs = (
                pb.PutRequest(fingerprint=fp or b"", chunks=[pb.Chunk(
                    header=encode_prefix(c.header), payload=bytes(host_view(c.payload)))])
                for c in group
            )  # fmt: skip
            out += self._call("Put", msgs).stored
        return out

    def _grpc_get(self, keys: list[str], outs: Any, fp: Any, results: list) -> None:
        try:
            for reply in self._call("Get", pb.GetRequest(keys=keys, fingerprint=fp or b"")):
                header = _header(reply.chunk.header, reply.index, len(keys))
                dst, final = _destination(outs, reply.index, header.nbytes)
                np.copyto(dst, np.frombuffer(reply.chunk.payload, np.uint8))
                results[reply.index] = Chunk(header, _deliver(dst, final, header.nbytes))
        except grpc.RpcError as exc:
            raise _remote_error(exc) from None

    # -- connections ----------------------------------------------------------------
    def _put_groups(self, chunks: Sequence[Chunk]) -> Iterator[Sequence[Chunk]]:
        """Chunks in requests within the daemon's batch and request-size limits."""
        max_batch = self._limits.get("max_batch", 1024)
        max_bytes = self._limits.get("max_request_bytes", 64 << 20)
        start, size = 0, 0
        for i, c in enumerate(chunks):
            if i > start and (i - start >= max_batch or size + c.header.nbytes > max_bytes):
                yield chunks[start:i]
                start, size = i, 0
            size += c.header.nbytes
        if start < len(chunks):
            yield chunks[start:]

    def _borrow(self, transport: str) -> _Borrowed:
        return _Borrowed(self, transport)

    def _take(self, transport: str) -> _Conn:
        with self._lock:
            if any(conn.pid != os.getpid() for conn in self._idle):  # we are a forked child
                self._idle = [conn for conn in self._idle if conn.pid == os.getpid()]
                self._pools = {}  # the parent's; pins and reads are per process
            for i, conn in enumerate(self._idle):
                if conn.ucx != (transport == "ucx"):
                    continue
                if transport in ("stream", "ucx"):
                    return self._idle.pop(i)
                # auto/shm: a connection of the kind the daemon allows; while that is
                # unknown (no attach tried yet), a new one that tries
                if self._shm_ok is not None and (conn.region is not None) == self._shm_ok:
                    return self._idle.pop(i)
        return self._connect(transport)

    def _connect(self, transport: str) -> _Conn:
        if self._stream_port is None:
            self.health()
        sock = socket.create_connection(
            (self.address.host, self._stream_port), timeout=self.connect_timeout
        )
        try:
            tune(sock)
            sock.settimeout(self.timeout)
            send_frame(sock, {"op": "hello", "token": self.token, "client": self._name})
            self._limits = check_reply(recv_frame(sock))
            if transport == "ucx":
                from store.wire.ucx_transport import client_upgrade

                return _Conn(client_upgrade(sock, self.timeout, self.connect_timeout), None, True)
            region, pool = None, None
            if transport != "stream" and self._shm_ok is not False:
                region, pool = self._attach(sock, self.region_bytes)
                self._shm_ok = region is not None
            return _Conn(sock, region, pool=pool)
        except BaseException:
            sock.close()
            raise

    def _release(self, conn: _Conn, ok: bool, lost: bool = False) -> None:
        """Pool ``conn`` again, or close it after a failure. ``lost``: the daemon may be
        gone, so this client forgets its mapping of the daemon's pool as well, and it is
        unmapped once no connection uses it: a dead daemon's pool memory lives on as
        long as any process maps it (a connection to a restarted daemon maps the new
        pool)."""
        if not ok:
            conn.close()
            self._stream_port = None  # the daemon may have restarted elsewhere
            if lost:  # forgotten, not closed: connections still using it keep it mapped
                with self._lock:
                    self._pools = {}
            return
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._pools = {}  # unmapped when the last connection using it goes
        for conn in idle:
            conn.close()
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Borrowed:
    """``with client._borrow(t) as conn``: a connection, returned to the pool if the
    request completed, closed if anything went wrong (the stream may be out of step)."""

    def __init__(self, client: KVStoreClient, transport: str) -> None:
        self.client, self.transport = client, transport

    def __enter__(self) -> _Conn:
        self.conn = self.client._take(self.transport)
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        lost = exc_type is not None and issubclass(exc_type, OSError)
        self.client._release(self.conn, exc_type is None, lost)


class _Offset:
    """A view of ``results`` from ``start`` (for finishing a get on another path)."""

    def __init__(self, results: list, start: int) -> None:
        self.results, self.start = results, start

    def __setitem__(self, i: int, v: Any) -> None:
        self.results[self.start + i] = v


def _replies(sock: socket.socket) -> Iterator[dict[str, Any]]:
    """The frames of one answer: parts, then the final ``ok`` frame (an error frame raises)."""
    while True:
        meta = check_reply(recv_frame(sock))
        yield meta
        if "part" not in meta:
            return


def _header(raw: Any, index: Any, n: int) -> Any:
    if not isinstance(index, int) or not 0 <= index < n:
        raise RemoteError("INTERNAL", f"daemon answered for key index {index!r} of {n}")
    global _headers  # noqa: PLW0603 (rebound when full)
    hit = _headers.get(raw) if isinstance(raw, bytes) else None
    if hit is not None:
        return hit
    try:
        header = decode_header(raw)[0]
    except ChunkError as exc:
        raise RemoteError("INTERNAL", f"daemon sent an unreadable header: {exc}") from None
    if isinstance(raw, bytes):
        if len(_headers) >= _HEADER_CACHE:
            _headers = {}
        _headers[raw] = header
    return header


def _destination(outs: Any, index: int, nbytes: int) -> tuple[np.ndarray, Any]:
    """Where to land a payload: the caller's host buffer if it fits, else a new array.
    Returns (host buffer, the caller's device tensor to copy into afterwards, or None)."""
    out = outs[index] if outs is not None else None
    if type(out) is np.ndarray and out.dtype == np.uint8 and out.flags.c_contiguous:
        if out.nbytes >= nbytes:  # the common case, without the generic conversions
            return out.reshape(-1)[:nbytes], None
    if out is not None and not on_device(out):
        flat = host_array(flat_bytes(out))
        if flat.nbytes >= nbytes:
            return flat[:nbytes], None
    return np.empty(nbytes, dtype=np.uint8), out if out is not None and on_device(out) else None


def _deliver(dst: np.ndarray, device_out: Any, nbytes: int) -> Any:
    if device_out is None:
        return dst
    target = flat_bytes(device_out)[:nbytes]
    import torch

    target.copy_(torch.from_numpy(dst))
    return target


def _tail(outs: Any, start: int) -> Any:
    return None if outs is None else list(outs)[start:]


def _aligned(n: int) -> int:
    return -(-n // 64) * 64


def _remote_error(exc: grpc.RpcError) -> RemoteError:
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    return RemoteError(name, exc.details() if hasattr(exc, "details") else str(exc))
