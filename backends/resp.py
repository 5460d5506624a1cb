"""Zero-copy SET values for redis-py: header and payload go out as two buffers.

A chunk object is ``prefix+header`` followed by a payload of up to many MiB. Joining the
two into one ``bytes`` would copy the payload once more per SET, which costs a visible
share of loopback bandwidth. RESP lets a bulk string arrive in pieces
(``$<total>\\r\\n`` + bytes + ``\\r\\n``), so this packer sends the parts as they are,
the way redis-py already sends one large memoryview argument.
"""

from __future__ import annotations

from typing import Any

from redis.connection import Connection, PythonRespSerializer, SSLConnection

from store.chunk import Chunk, encode_prefix, host_view

_CRLF = b"\r\n"


class Parts(tuple):
    """One RESP bulk-string argument made of several buffers, sent back to back."""

    @property
    def nbytes(self) -> int:
        return sum(memoryview(p).nbytes for p in self)


def zero_copy_value(chunk: Chunk) -> Parts:
    """The encoded chunk as a SET value that the packer sends without joining."""
    return Parts((encode_prefix(chunk.header), host_view(chunk.payload)))


class _Packer(PythonRespSerializer):
    def pack(self, *args: Any) -> list[Any]:
        if not any(isinstance(a, Parts) for a in args):
            return super().pack(*args)
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        out: list[Any] = []
        buff = b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, Parts):
                out.append(buff + b"$%d\r\n" % arg.nbytes)
                out.extend(memoryview(p).cast("B") for p in arg)
                buff = _CRLF
                continue
            arg = self.encode(arg)
            buff += b"$%d\r\n" % len(arg) + bytes(arg) + _CRLF
        out.append(buff)
        return out


class ZeroCopyConnection(Connection):
    """A redis-py connection that understands ``Parts`` values."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command_packer = _Packer(self._buffer_cutoff, self.encoder.encode)


class ZeroCopySSLConnection(SSLConnection):
    """The TLS twin of ``ZeroCopyConnection``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command_packer = _Packer(self._buffer_cutoff, self.encoder.encode)


def connection_class_for(url: str) -> type[Connection]:
    return ZeroCopySSLConnection if url.startswith("rediss://") else ZeroCopyConnection
