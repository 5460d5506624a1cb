"""The gRPC control API (store/wire/proto/kvstore.proto) over a StoreService.

Statuses: malformed input, a broken limit or a method this daemon does not know is
INVALID_ARGUMENT (with a message); a missing or wrong bearer token UNAUTHENTICATED; a
token without the right (auth.py: a read-only token's Put, a salt-bound token's key of
another salt) PERMISSION_DENIED; a request during shutdown UNAVAILABLE. A message larger than a whole put may carry
(``--max-request-size`` plus 1 MiB) is refused by gRPC itself, RESOURCE_EXHAUSTED, as
is a Lease over one of the lease caps (lease.py). Every method but Put is held to a
small message limit, checked before the message is parsed, and bytes that do not
parse are INVALID_ARGUMENT too (grpc_guard.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from store.daemon.activity import Activity, Draining
from store.daemon.auth import OPEN, Authenticator, Grant, PermissionDenied, Visible
from store.daemon.grpc_guard import MessageGuard, refusal, small_message_bytes
from store.daemon.lease import LeaseLimits, LeaseRefused, LeaseTable, payload_bytes
from store.daemon.service import BadRequest, StoreService
from store.wire.constants import CLIENT_HEADER
from store.wire.proto import kvstore_pb2 as pb
from store.wire.proto import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
VERSION = "1"


SERVICE_PREFIX = "/kvstore.v1.KVStore/"


class BearerAuth(grpc.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer <token>`` of a known token
    (UNAUTHENTICATED), and every method the token's scope lacks (PERMISSION_DENIED),
    before a request message is read."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return handler
        grant = self.auth.grant_of_metadata(details.invocation_metadata)
        if grant is None:
            # answered without reading the message (grpc_guard.py): an unauthenticated
            # 200 MB Lookup is never parsed
            return refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        method = str(details.method)
        ours = method.startswith(SERVICE_PREFIX)
        why = grant.refusal(method[len(SERVICE_PREFIX) :]) if ours else None
        return handler if why is None else refusal(grpc.StatusCode.PERMISSION_DENIED, why)


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

    def __init__(
        self,
        service: StoreService,
        activity: Activity,
        stream_port: int,
        auth: Authenticator | None = None,
    ) -> None:
        self.service = service
        self.activity = activity
        self.stream_port = stream_port
        self.stream_serving: Callable[[], bool] = lambda: True  # serve.py: StreamServer.serving
        self.auth = auth or Authenticator()  # BearerAuth has refused unknown tokens
        self.leases = LeaseTable(
            service.store.pin,
            service.store.unpin,
            limits=LeaseLimits.from_config(service.store.config),
        )

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
        except PermissionDenied as exc:
            self.activity.errors.labels(method, "PERMISSION_DENIED").inc()
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    def _grant(self, context: grpc.ServicerContext) -> Grant:
        """The caller's grant (BearerAuth let only known tokens through)."""
        if not self.auth.required:
            return OPEN
        grant = self.auth.grant_of_metadata(context.invocation_metadata())
        if grant is None:  # unreachable behind BearerAuth; never serve on a guess
            raise PermissionDenied("missing or wrong bearer token")
        return grant

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupReply:
        with self._request("Lookup", context):
            keys, grant = list(request.keys), self._grant(context)
            if grant.salt_tag is not None:  # answer for its own salt's keys only
                keys = grant.leading(self.service.check_keys(keys))
            tiers = self.service.lookup(keys)
            return pb.LookupReply(count=len(tiers), tiers=tiers)

    def Put(self, requests: Iterator[pb.PutRequest], context: grpc.ServicerContext) -> pb.PutReply:
        with self._request("Put", context):
            chunks, nbytes = [], 0
            grant = self._grant(context)
            for req in requests:  # check everything before storing anything
                for c in req.chunks:
                    nbytes += len(c.payload)
                    self.service.check_put_size(len(chunks) + 1, nbytes)
                    chunks.append(
                        self.service.check_chunk(c.header, c.payload, req.fingerprint, c.block_hash)
                    )
                    grant.check_own([chunks[-1].key], "Put")
            self.activity.bytes.labels("in", "grpc").inc(nbytes)
            return pb.PutReply(stored=self.service.put(chunks))

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[pb.GetReply]:
        with self._request("Get", context):
            keys, grant = list(request.keys), self._grant(context)
            if grant.salt_tag is not None:  # other salts' keys are misses
                seen = grant.visible(self.service.check_keys(keys))
            else:
                seen = Visible(keys, None, len(keys))
            keys = self.service.check_keys(seen.keys)
            encode = self.service.prefixes.encode
            # the one get path (get_path.py), its payloads copied into messages
            for part in self.service.gets.parts(keys, request.fingerprint or None):
                for p in part:
                    payload = bytes(p.payload)
                    self.activity.bytes.labels("out", "grpc").inc(len(payload))
                    chunk = pb.Chunk(header=encode(p.header), payload=payload)
                    yield pb.GetReply(index=seen.at(p.index), chunk=chunk)

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteReply:
        with self._request("Delete", context):
            keys = self.service.check_keys(list(request.keys))
            self._grant(context).check_own(keys, "Delete")
            return pb.DeleteReply(removed=self.service.delete(keys))

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
            grant = self._grant(context)
            grant.check_own(keys, "Lease")
            # Capped per client (its token, else the name it sends, else its address) and
            # in all.
            client = (
                grant.holder
                or dict(context.invocation_metadata() or ()).get(CLIENT_HEADER)
                or context.peer()
            )
            try:
                lease_id, count, expires = self.leases.lease(
                    keys,
                    request.ttl_seconds,
                    lambda: len(self.service.lookup(keys)),
                    client,
                    lambda ks: payload_bytes(self.service.sizes.get, ks),
                )
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            except LeaseRefused as exc:  # over a cap: the decode node recomputes
                self.activity.errors.labels("Lease", "RESOURCE_EXHAUSTED").inc()
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return pb.LeaseReply(
                lease_id=lease_id, count=count, expires_at=expires, active=self.leases.active
            )

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseReply:
        with self._request("Release", context):
            released = self.leases.release(request.lease_id)
            return pb.ReleaseReply(released=released, active=self.leases.active)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        # Not counted as in flight: a health probe must answer while draining.
        limits = self.service.limits
        return pb.HealthReply(
            status=self._status(),
            version=VERSION,
            stream_port=self.stream_port,
            tiers=[t.name for t in self.service.store.tiers],
            max_chunk_bytes=limits.max_chunk_bytes,
            max_batch=limits.max_batch,
            max_request_bytes=limits.max_request_bytes,
        )

    def _status(self) -> str:
        """``draining`` once shutdown began; ``not_serving`` while the stream port
        accepts no connections (its accept loop ended: stream_server.py); else ``serving``."""
        if self.activity.draining:
            return "draining"
        return "serving" if self.stream_serving() else "not_serving"


def _tier_stats(name: str, s: Any) -> pb.TierStats:
    def known(v: int | None) -> int:
        return -1 if v is None else v

    return pb.TierStats(
        tier=name,
        hits=s.hits,
        misses=s.misses,
        bytes_read=s.bytes_read,
        bytes_written=s.bytes_written,
        put_failures=s.put_failures,
        checksum_failures=s.checksum_failures,
        evictions=s.evictions,
        items=known(s.items),
        bytes_used=known(s.bytes_used),
        bytes_capacity=known(s.bytes_capacity),
    )


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def start_grpc(
    servicer: KVStoreServicer,
    address: str,
    auth: Authenticator,
    max_message_bytes: int,
    threads: int = 16,
) -> tuple[grpc.Server, int]:
    """A started server on ``address`` (``host:port``, port 0 picks one) and its port."""
    # Tokens and scopes first: a refused call is answered before its message is read.
    interceptors: list[Any] = [BearerAuth(auth)] if auth.required else []
    small = small_message_bytes(servicer.service.limits.max_batch)
    interceptors.append(MessageGuard(small, servicer.activity.errors))
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
