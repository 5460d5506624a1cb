"""The gRPC control API (store/proto/kvstore.proto) over a StoreService.

Statuses: malformed input, a broken limit or a method this daemon does not know is
INVALID_ARGUMENT (with a message); a missing or wrong bearer token UNAUTHENTICATED; a
request during shutdown UNAVAILABLE. A message larger than a whole put may carry
(``--max-request-size`` plus 1 MiB) is refused by gRPC itself, RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from store.chunk import encode_prefix
from store.daemon.activity import Activity, Draining
from store.daemon.lease import LeaseTable
from store.daemon.service import BadRequest, StoreService
from store.proto import kvstore_pb2 as pb
from store.proto import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
VERSION = "1"
CLIENT_HEADER = "x-kvstore-client"


class BearerAuth(grpc.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or self.allowed(details.invocation_metadata):
            return handler
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def allowed(self, metadata: Any) -> bool:
        given = dict(metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given, self._expected)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same shape as ``handler`` that aborts with ``code``."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(abort, handler.request_deserializer, handler.response_serializer)


class UnknownMethod(grpc.GenericRpcHandler):
    """The handler of last resort: any method the service lacks is INVALID_ARGUMENT,
    whatever its shape (without it gRPC answers UNIMPLEMENTED)."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        message = f"unknown method {str(details.method)[:80]!r} (kvstore.v1.KVStore has " + (
            "Lookup, Put, Get, Delete, Stats, Health, Lease, Release)"
        )

        def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        return grpc.stream_stream_rpc_method_handler(refuse)


class KVStoreServicer(pb_grpc.KVStoreServicer):
    """Each method: count the request, map BadRequest/Draining to a status, answer."""

    def __init__(self, service: StoreService, activity: Activity, stream_port: int) -> None:
        self.service = service
        self.activity = activity
        self.stream_port = stream_port
        self.leases = LeaseTable(service.store.pin, service.store.unpin)

    @contextmanager
    def _request(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        client = dict(context.invocation_metadata() or ()).get(CLIENT_HEADER) or context.peer()
        try:
            with self.activity.request(client, method, "grpc"):
                yield
        except BadRequest as exc:
            self.activity.errors.labels(method, "INVALID_ARGUMENT").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Draining as exc:
            self.activity.errors.labels(method, "UNAVAILABLE").inc()
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupReply:
        with self._request("Lookup", context):
            tiers = self.service.lookup(list(request.keys))
            return pb.LookupReply(count=len(tiers), tiers=tiers)

    def Put(self, requests: Iterator[pb.PutRequest], context: grpc.ServicerContext) -> pb.PutReply:
        with self._request("Put", context):
            chunks, nbytes = [], 0
            for req in requests:  # check everything before storing anything
                for c in req.chunks:
                    nbytes += len(c.payload)
                    self.service.check_put_size(len(chunks) + 1, nbytes)
                    chunks.append(
                        self.service.check_chunk(c.header, c.payload, req.fingerprint, c.block_hash)
                    )
            self.activity.bytes.labels("in", "grpc").inc(nbytes)
            return pb.PutReply(stored=self.service.put(chunks))

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[pb.GetReply]:
        with self._request("Get", context):
            for part in self.service.get_parts(list(request.keys), request.fingerprint or None):
                for p in part:
                    payload = bytes(p.payload)
                    self.activity.bytes.labels("out", "grpc").inc(len(payload))
                    chunk = pb.Chunk(header=encode_prefix(p.header), payload=payload)
                    yield pb.GetReply(index=p.index, chunk=chunk)

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteReply:
        with self._request("Delete", context):
            return pb.DeleteReply(removed=self.service.delete(list(request.keys)))

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        with self._request("Stats", context):
            tiers = [_tier_stats(name, s) for name, s in self.service.stats().items()]
            return pb.StatsReply(
                tiers=tiers,
                uptime_seconds=self.activity.uptime(),
                requests=self.activity.total,
                in_flight=self.activity.in_flight,
            )

    def Lease(self, request: pb.LeaseRequest, context: grpc.ServicerContext) -> pb.LeaseReply:
        with self._request("Lease", context):
            keys = self.service.check_keys(list(request.keys))
            try:
                lease_id, count, expires = self.leases.lease(
                    keys, request.ttl_seconds, lambda: len(self.service.lookup(keys))
                )
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            return pb.LeaseReply(lease_id=lease_id, count=count, expires_at=expires,
                                 active=self.leases.active)  # fmt: skip

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseReply:
        with self._request("Release", context):
            released = self.leases.release(request.lease_id)
            return pb.ReleaseReply(released=released, active=self.leases.active)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        # Not counted as in flight: a health probe must answer while draining.
        limits = self.service.limits
        return pb.HealthReply(
            status="draining" if self.activity.draining else "serving",
            version=VERSION,
            stream_port=self.stream_port,
            tiers=[t.name for t in self.service.store.tiers],
            max_chunk_bytes=limits.max_chunk_bytes,
            max_batch=limits.max_batch,
            max_request_bytes=limits.max_request_bytes,
        )


def _tier_stats(name: str, s: Any) -> pb.TierStats:
    def known(v: int | None) -> int:
        return -1 if v is None else v

    return pb.TierStats(
        tier=name, hits=s.hits, misses=s.misses, bytes_read=s.bytes_read,
        bytes_written=s.bytes_written, put_failures=s.put_failures,
        checksum_failures=s.checksum_failures, evictions=s.evictions, items=known(s.items),
        bytes_used=known(s.bytes_used), bytes_capacity=known(s.bytes_capacity),
    )  # fmt: skip


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def start_grpc(
    servicer: KVStoreServicer,
    address: str,
    token: str | None,
    max_message_bytes: int,
    threads: int = 16,
) -> tuple[grpc.Server, int]:
    """A started server on ``address`` (``host:port``, port 0 picks one) and its port."""
    interceptors = [BearerAuth(token)] if token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(threads, thread_name_prefix="kvstore-grpc"),
        interceptors=interceptors,
        options=grpc_options(max_message_bytes),
        maximum_concurrent_rpcs=threads * 8,
    )
    pb_grpc.add_KVStoreServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((UnknownMethod(),))  # tried after the service's
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port
