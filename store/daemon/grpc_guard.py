"""Checks on gRPC requests before their messages are parsed (docs/daemon.md, "Limits").

gRPC Python reads a request message whole (up to the server-wide limit, which must let
a Put carry a whole request) and hands the bytes to the method's deserializer before
the method runs. Two things follow from that:

* a call that is refused anyway (no token, a scope without the method) must be refused
  by a handler that never reads its message: ``refusal`` answers at once, and gRPC
  drops the message unread;
* every other method's deserializer is wrapped (``MessageGuard``): it checks the size
  before parsing (``small_message_bytes`` for every method but Put, whose messages
  carry payloads) and turns bytes that are not the method's message into ``Refused``,
  which the method's handler answers with INVALID_ARGUMENT. (A deserializer that raises
  makes gRPC answer INTERNAL, and parsing a 24 MB Lookup of one-character keys cost
  the daemon gigabytes.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc

LARGE_METHODS = frozenset({"Put"})
"""Methods whose messages carry payloads: held only to the server-wide message limit."""


class Refused(NamedTuple):
    """What the guarded deserializer returns instead of a message it will not parse."""

    message: str


def small_message_bytes(max_batch: int) -> int:
    """The message limit of every method but Put: room for ``max_batch`` keys of 64 hex
    characters (66 bytes each on the wire) and a fingerprint, twice over."""
    return max(64 << 10, max_batch * 128 + (4 << 10))


def refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` without reading the request's message: streaming
    in, so gRPC hands it an iterator that it never advances. It suits calls of any
    shape (gRPC's framing is the same for all)."""

    def abort(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(abort)


class MessageGuard(grpc.ServerInterceptor):
    """Wraps each method's deserializer: a message over the method's limit, or bytes
    that do not parse, reach the method as ``Refused`` and are answered INVALID_ARGUMENT
    (counted in ``errors``, a Counter labelled by method and code, when given)."""

    def __init__(self, small_bytes: int, errors: Any = None) -> None:
        self.small_bytes = small_bytes
        self.errors = errors
        # per method: the service's handler and its guarded twin, built once (gRPC asks
        # the interceptor on every call; only the service's own methods get here)
        self._guards: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler  # not ours (UnknownMethod reads nothing)
        known = self._guards.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        method = str(details.method).rsplit("/", 1)[-1]
        limit = None if method in LARGE_METHODS else self.small_bytes
        guarded = self._guarded(handler, method, limit)
        self._guards[details.method] = (handler, guarded)
        return guarded

    def _guarded(self, handler: Any, method: str, limit: int | None) -> grpc.RpcMethodHandler:
        parse = _parser(handler.request_deserializer, method, limit)
        check = self._check(method)
        serialize = handler.response_serializer
        if handler.request_streaming:
            inner = handler.stream_unary or handler.stream_stream

            def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return inner((check(r, context) for r in requests), context)

            make = (
                grpc.stream_stream_rpc_method_handler
                if handler.response_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            return make(streaming, parse, serialize)
        if handler.response_streaming:

            def replies(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                yield from handler.unary_stream(check(request, context), context)

            return grpc.unary_stream_rpc_method_handler(replies, parse, serialize)

        def reply(request: Any, context: grpc.ServicerContext) -> Any:
            return handler.unary_unary(check(request, context), context)

        return grpc.unary_unary_rpc_method_handler(reply, parse, serialize)

    def _check(self, method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        def check(request: Any, context: grpc.ServicerContext) -> Any:
            if type(request) is Refused:
                if self.errors is not None:
                    self.errors.labels(method, "INVALID_ARGUMENT").inc()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return request

        return check


def _parser(deserialize: Callable[[bytes], Any], method: str, limit: int | None) -> Any:
    """``deserialize`` that returns Refused for oversized or unparsable bytes."""
    kind = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = kind.full_name if kind is not None else "request"

    def parse(data: bytes) -> Any:
        if limit is not None and len(data) > limit:
            return Refused(
                f"{method} request of {len(data)} bytes exceeds the limit of {limit} bytes "
                "for this method"
            )
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or bad UTF-8 in a string field
            return Refused(f"malformed {method} request: the bytes are not a {name} message")

    return parse
