"""Client of a ``kvstore serve`` daemon: gRPC for control, a socket stream or shared memory
for bulk data.

``transport`` chooses the bulk path of ``get`` and ``put`` (transport.py has the
interface, one module per path):

* ``shm`` (same host only, shm.py): gets copy first-tier hits out of the daemon's shared
  pool, mapped read-only; the daemon reads puts out of this process (cross-memory
  attach) where permitted; anything else crosses a shared-memory region;
* ``stream`` (stream.py): payloads on the daemon's stream port, straight into the
  caller's buffers;
* ``grpc`` (grpc_bulk.py): payloads inline in gRPC messages (slowest; what other
  languages would use);
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

from kvcore.chunk import Chunk
from kvcore.shared_memory import PoolMapping
from store.client.grpc_bulk import GrpcTransport, remote_error
from store.client.shm import RegionLink, ShmTransport
from store.client.stream import StreamTransport
from store.client.transport import Conn, Transport
from store.wire import messages as m
from store.wire.constants import CLIENT_HEADER, DEFAULT_PORT, IN_POOL, TRANSPORTS, WINDOW_START
from store.wire.proto import kvstore_pb2 as pb
from store.wire.proto import kvstore_pb2_grpc as pb_grpc
from store.wire.stream import check_reply, recv_frame, send_frame, tune

__all__ = ["IN_POOL", "TRANSPORTS", "WINDOW_START", "Address", "KVStoreClient", "parse_url"]


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
        host, _, end = rest[1:].partition("]")
        port = end.removeprefix(":") or port
    elif ":" in rest:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"daemon url {url!r}: expected kvstore://host:port")
    return Address(host, int(port))


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
        self._metadata = [(CLIENT_HEADER, name)]
        self._name = name
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        host = f"[{self.address.host}]" if ":" in self.address.host else self.address.host
        self._channel = grpc.insecure_channel(
            f"{host}:{self.address.port}",
            options=[
                ("grpc.max_receive_message_length", 1 << 30),
                ("grpc.max_send_message_length", 1 << 30),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._methods = {
            "Health": self._stub.Health,
            "Lookup": self._stub.Lookup,
            "Put": self._stub.Put,
            "Get": self._stub.Get,
            "Delete": self._stub.Delete,
            "Stats": self._stub.Stats,
            "Lease": self._stub.Lease,
            "Release": self._stub.Release,
        }
        self._idle: list[Conn] = []
        self._lock = threading.Lock()
        self._stream_port: int | None = None
        self._limits: dict[str, int] = {}
        self._regions = RegionLink(
            connect_timeout, self._lock, None if transport in ("auto", "shm") else False
        )
        stream = StreamTransport()
        shm = ShmTransport(self._regions, stream)
        self._paths: dict[str, Transport] = {
            "auto": shm,
            "shm": shm,
            "stream": stream,
            "ucx": stream,  # the stream's frames, over a UcxSocket
            "grpc": GrpcTransport(self._call),
        }

    @property
    def _pools(self) -> dict[str, PoolMapping]:
        """This client's mappings of the daemon's shared pool (shm.py)."""
        return self._regions.pools

    # -- control (gRPC) -------------------------------------------------------------
    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return self._methods[method](
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise remote_error(exc) from None

    def health(self, timeout: float | None = None) -> pb.HealthReply:
        reply = self._call("Health", pb.HealthRequest(), timeout or self.connect_timeout)
        self._stream_port = reply.stream_port
        if reply.max_batch and reply.max_request_bytes:  # 0: a daemon that does not say
            self._limits = {
                "max_batch": reply.max_batch,
                "max_request_bytes": reply.max_request_bytes,
            }
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
        path = self._paths[transport]
        out: list[bool] = []
        for group in self._put_groups(chunks):
            out += self._run(transport, path, path.put, group, fingerprint)
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
        path = self._paths[transport]
        self._run(transport, path, path.get, list(keys), outs, fingerprint, results)
        return results

    def _run(self, transport: str, path: Transport, op: Any, *args: Any) -> Any:
        """``op(conn, *args)`` on a borrowed connection (None for a path that needs none).

        A pooled connection may be dead (the daemon restarted): a failure to even send on
        one that was idle is retried once on a fresh connection. Gets and puts are
        idempotent (keys name content), so a retry never stores anything twice."""
        if not path.needs_conn:
            return op(None, *args)
        for attempt in (0, 1):
            reused = bool(self._idle)
            try:
                with self._borrow(transport) as conn:
                    return op(conn, *args)
            except (ConnectionError, BrokenPipeError) as exc:
                if attempt or not reused or isinstance(exc, TimeoutError):
                    raise
                with self._lock:
                    stale, self._idle = self._idle, []
                for conn in stale:
                    conn.close()
        raise AssertionError("unreachable")

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

    # -- connections ----------------------------------------------------------------
    def _borrow(self, transport: str) -> _Borrowed:
        return _Borrowed(self, transport)

    def _take(self, transport: str) -> Conn:
        with self._lock:
            if any(conn.pid != os.getpid() for conn in self._idle):  # we are a forked child
                self._idle = [conn for conn in self._idle if conn.pid == os.getpid()]
                self._regions.pools = {}  # the parent's; pins and reads are per process
            shm_ok = self._regions.ok
            for i, conn in enumerate(self._idle):
                if conn.ucx != (transport == "ucx"):
                    continue
                if transport in ("stream", "ucx"):
                    return self._idle.pop(i)
                # auto/shm: a connection of the kind the daemon allows; while that is
                # unknown (no attach tried yet), a new one that tries
                if shm_ok is not None and (conn.region is not None) == shm_ok:
                    return self._idle.pop(i)
        return self._connect(transport)

    def _connect(self, transport: str) -> Conn:
        if self._stream_port is None:
            self.health()
        sock = socket.create_connection(
            (self.address.host, self._stream_port), timeout=self.connect_timeout
        )
        try:
            tune(sock)
            sock.settimeout(self.timeout)
            send_frame(sock, m.Hello(self.token, self._name).to_wire())
            self._limits = m.HelloReply.from_wire(check_reply(recv_frame(sock))).limits()
            if transport == "ucx":
                from store.wire.ucx_transport import client_upgrade

                return Conn(client_upgrade(sock, self.timeout, self.connect_timeout), None, True)
            region, pool = None, None
            if transport != "stream" and self._regions.ok is not False:
                region, pool = self._regions.attach(sock, self.region_bytes)
                self._regions.ok = region is not None
            return Conn(sock, region, pool=pool)
        except BaseException:
            sock.close()
            raise

    def _release(self, conn: Conn, ok: bool, lost: bool = False) -> None:
        """Pool ``conn`` again, or close it after a failure. ``lost``: the daemon may be
        gone, so this client forgets its mapping of the daemon's pool as well, and it is
        unmapped once no connection uses it: a dead daemon's pool memory lives on as
        long as any process maps it (a connection to a restarted daemon maps the new
        pool)."""
        if not ok:
            conn.close()
            self._stream_port = None  # the daemon may have restarted elsewhere
            if lost:  # forgotten, not closed: connections still using it keep it mapped
                self._regions.forget_pools()
            return
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        self._regions.forget_pools()  # unmapped when the last connection using it goes
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

    def __enter__(self) -> Conn:
        self.conn = self.client._take(self.transport)
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        lost = exc_type is not None and issubclass(exc_type, OSError)
        self.client._release(self.conn, exc_type is None, lost)
