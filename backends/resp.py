"""RESP plumbing for the redis tier: zero-copy SET values, and GET replies read in place.

Puts: a chunk object is ``prefix+header`` followed by a payload of up to many MiB.
Joining the two into one ``bytes`` would copy the payload once more per SET, which costs
a visible share of loopback bandwidth. RESP lets a bulk string arrive in pieces
(``$<total>\\r\\n`` + bytes + ``\\r\\n``), so this packer sends the parts as they are,
the way redis-py already sends one large memoryview argument.

Gets: redis-py's reply parser copies each bulk string three times (socket -> read
buffer -> ``bytes`` -> a slice without the CRLF) before the tier could copy it once more
into the caller's buffer; at 64 KiB that per-reply work, not the network, bounds a
get. ``ChunkReplyReader`` parses the replies of pipelined GETs itself: the small parts
(reply line, chunk prefix, header) through a small buffer, the payload with
``recv_into`` straight into the caller's buffer, hashed there while it is hot.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
from redis.connection import Connection, PythonRespSerializer, SSLConnection

from kvcore.chunk import (
    PREFIX_SIZE,
    CheckedChunk,
    Chunk,
    ChunkError,
    HeaderCache,
    checked,
    decode_prefix,
    encode_prefix,
    host_view,
)

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
    """A redis-py connection that understands ``Parts`` values and lends its socket to
    ``ChunkReplyReader``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command_packer = _Packer(self._buffer_cutoff, self.encoder.encode)

    def raw_socket(self) -> socket.socket:
        """The connected socket (connecting first), for a reader that parses replies itself."""
        if self._sock is None:
            self.connect()
        return self._sock


class ZeroCopySSLConnection(SSLConnection):
    """The TLS twin of ``ZeroCopyConnection``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command_packer = _Packer(self._buffer_cutoff, self.encoder.encode)

    raw_socket = ZeroCopyConnection.raw_socket


def connection_class_for(url: str) -> type[Connection]:
    return ZeroCopySSLConnection if url.startswith("rediss://") else ZeroCopyConnection


def pack_gets(keys: Sequence[bytes]) -> bytes:
    """Pipelined ``GET key`` commands as one RESP buffer."""
    return b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k) for k in keys)


class ProtocolError(OSError):
    """The reply stream is not what was asked for; the connection must be dropped."""


class ChunkReplyReader:
    """Reads the replies of pipelined GETs of chunk objects from ``sock``.

    ``read_chunk(key, out)`` returns the next reply (to a GET of ``key``) as a
    ``CheckedChunk`` whose payload is in ``out`` (a flat uint8 host array, or a fresh
    one when ``out`` is None), ``None`` for a nil reply, or a ``ChunkError`` for a value
    that is not an intact chunk (the reply is consumed either way, so the stream stays
    in step). Socket errors, timeouts, other server errors and a garbled stream raise
    ``OSError``; after any exception the connection is unusable.
    """

    def __init__(self, sock: socket.socket, headers: HeaderCache, fill: int = 8192) -> None:
        self._sock = sock
        self._headers = headers
        self._buf = bytearray(2 * fill)
        self._view = memoryview(self._buf)
        self._fill = fill
        self._pos = self._end = 0

    # -- the byte stream ------------------------------------------------------------
    def _more(self) -> None:
        """Read at least one more byte into the buffer (at most ``fill``)."""
        if self._pos == self._end:
            self._pos = self._end = 0
        elif self._end + self._fill > len(self._buf):  # keep the unread bytes, at the front
            left = self._end - self._pos
            buf = bytearray(max(len(self._buf), left + self._fill))
            buf[:left] = self._view[self._pos : self._end]
            self._buf, self._view = buf, memoryview(buf)
            self._pos, self._end = 0, left
        n = self._sock.recv_into(self._view[self._end : self._end + self._fill])
        if not n:
            raise ProtocolError("server closed the connection")
        self._end += n

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(_CRLF, self._pos, self._end)
            if i >= 0:
                line = bytes(self._view[self._pos : i])
                self._pos = i + 2
                return line
            if self._end - self._pos > 1 << 16:
                raise ProtocolError("reply line too long")
            self._more()

    def _take(self, n: int) -> bytes:
        while self._end - self._pos < n:
            self._more()
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return out

    def _read_into(self, dst: memoryview) -> None:
        """Fill ``dst`` exactly: buffered bytes first, then straight from the socket."""
        got = min(self._end - self._pos, dst.nbytes)
        dst[:got] = self._view[self._pos : self._pos + got]
        self._pos += got
        while got < dst.nbytes:
            n = self._sock.recv_into(dst[got:])
            if not n:
                raise ProtocolError("server closed the connection")
            got += n

    def _skip(self, n: int) -> None:
        while n:
            if self._pos == self._end:
                self._more()
            step = min(n, self._end - self._pos)
            self._pos += step
            n -= step

    # -- replies --------------------------------------------------------------------
    def read_chunk(self, key: str, out: np.ndarray | None) -> CheckedChunk | ChunkError | None:
        line = self._line()
        kind = line[:1]
        if kind == b"$":
            try:
                n = int(line[1:])
            except ValueError:
                raise ProtocolError(f"bad bulk length: {line[:40]!r}") from None
            return None if n < 0 else self._bulk_chunk(n, key, out)
        if kind == b"_":  # RESP3 null
            return None
        if kind == b"-":
            message = line[1:].decode(errors="replace")
            if message.startswith("WRONGTYPE"):  # a foreign value under a chunk key
                return ChunkError(f"server answered {message}")
            raise ProtocolError(f"server answered {message}")  # LOADING, NOAUTH, ...: fail
        raise ProtocolError(f"unexpected reply to GET: {line[:40]!r}")

    def _bulk_chunk(self, n: int, key: str, out: np.ndarray | None) -> CheckedChunk | ChunkError:
        """A bulk string of ``n`` bytes that should hold one chunk object."""
        if n < PREFIX_SIZE:
            self._skip(n + 2)
            return ChunkError(f"object of {n} bytes is shorter than a chunk prefix")
        prefix = self._take(PREFIX_SIZE)
        try:
            offset = decode_prefix(prefix).payload_offset
            if offset > n:
                raise ChunkError(f"object of {n} bytes is shorter than its header")
        except ChunkError as exc:
            self._skip(n - PREFIX_SIZE + 2)
            return exc
        try:
            header, _ = self._headers.decode(key, prefix + self._take(offset - PREFIX_SIZE))
        except ChunkError as exc:
            self._skip(n - offset + 2)
            return exc
        size = n - offset
        if size != header.nbytes:
            self._skip(size + 2)
            return ChunkError(f"payload is {size} bytes, header says {header.nbytes}")
        if out is None:
            out = np.empty(size, dtype=np.uint8)
        elif out.nbytes < size:
            self._skip(size + 2)
            raise ValueError(f"buffer of {out.nbytes} bytes is too small for a {size}-byte chunk")
        payload = out if out.nbytes == size else out[:size]
        self._read_into(memoryview(payload))
        if self._take(2) != _CRLF:
            raise ProtocolError("bulk string not terminated by CRLF")
        try:
            return checked(header, payload)
        except ChunkError as exc:
            return exc
