"""The gRPC transport: payloads inline in gRPC messages (slowest; the path any gRPC
client of kvstore.proto takes, so the Python client can test it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np

from kvcore.chunk import Chunk, encode_prefix, host_view
from store.client.transport import Transport, deliver, destination, header
from store.wire.proto import kvstore_pb2 as pb
from store.wire.stream import RemoteError


class GrpcTransport(Transport):
    """``call(method, request)``: the client's gRPC call (deadline, metadata, errors)."""

    needs_conn = False

    def __init__(self, call: Callable[[str, Any], Any]) -> None:
        self.call = call

    def put(self, conn: Any, chunks: Sequence[Chunk], fp: bytes | None) -> list[bool]:
        """One client-streamed Put, one message per chunk."""
        msgs = (
            pb.PutRequest(
                fingerprint=fp or b"",
                chunks=[
                    pb.Chunk(header=encode_prefix(c.header), payload=bytes(host_view(c.payload)))
                ],
            )
            for c in chunks
        )
        return list(self.call("Put", msgs).stored)

    def get(self, conn: Any, keys: list[str], outs: Any, fp: Any, results: Any) -> None:
        try:
            for reply in self.call("Get", pb.GetRequest(keys=keys, fingerprint=fp or b"")):
                h = header(reply.chunk.header, reply.index, len(keys))
                dst, final = destination(outs, reply.index, h.nbytes)
                np.copyto(dst, np.frombuffer(reply.chunk.payload, np.uint8))
                results[reply.index] = Chunk(h, deliver(dst, final, h.nbytes))
        except grpc.RpcError as exc:
            raise remote_error(exc) from None


def remote_error(exc: grpc.RpcError) -> RemoteError:
    """A gRPC failure as the RemoteError every transport raises."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    name = code.name if code is not None else "UNKNOWN"
    return RemoteError(name, exc.details() if isinstance(exc, grpc.Call) else str(exc))
