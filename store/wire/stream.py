"""The daemon's bulk-data stream: length-prefixed msgpack frames and raw payload bytes.

Why not gRPC for bulk data: gRPC Python copies every message between Python bytes and
C-core slices on both sides and reached about half the rate of a plain socket stream on
loopback (docs/daemon.md has the figures). Here a payload goes from the sender's buffer
to the socket with ``sendall`` and from the socket into the receiver's final buffer
with ``recv_into``: no copy above the kernel's.

Every message is a frame::

    | u32 meta_len | msgpack meta | payload bytes named by the meta (may be none) |

Requests are ``{"op": ...}`` frames; answers end with ``{"ok": True, ...}`` or
``{"error": CODE, "message": ...}`` (CODE is a gRPC status name, e.g. INVALID_ARGUMENT).
docs/daemon.md lists the ops and their frames.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_META_BYTES = 8 << 20
FIRST_READ_BYTES = 64 << 10
"""A frame's bytes are received into a buffer of at most this size first, doubled as
more arrive: a declared length reserves nothing the peer has not sent."""
_LEN = struct.Struct("<I")
IOV_MAX = 512  # buffers per sendmsg / recvmsg_into call (Linux allows 1024)


class StreamClosed(ConnectionError):
    """The peer closed the stream (or sent something that is not a frame)."""


class BadFrame(StreamClosed):
    """What arrived is not a frame (too large, not msgpack, not a map): the stream is out
    of step, so the receiver answers once, if it can, and hangs up."""


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What a received frame may be: its length, and what msgpack may build from it.

    The length alone does not bound memory: each empty list or map is one byte on the
    wire and ~70 bytes as a Python object, and a list header reserves room for all the
    items it declares. So the count of items per list and map, and of lists and maps in
    the whole frame, are bounded too (a frame over any of them is a BadFrame)."""

    max_bytes: int = MAX_META_BYTES
    max_list: int = 1 << 20  # items of one list
    max_map: int = 64  # entries of one map (request frames have a handful)
    max_containers: int = 1 << 16  # lists and maps in the whole frame

    def decode(self, raw: bytes | bytearray) -> Any:
        """``raw`` unpacked within these limits; raises on garbage or a broken limit."""
        left = self.max_containers

        def count(container: Any) -> Any:  # called as each list or map is completed
            nonlocal left
            left -= 1
            if left < 0:
                raise BadFrame(f"frame holds more than {self.max_containers} lists and maps")
            return container

        return msgpack.unpackb(
            raw,
            max_array_len=self.max_list,
            max_map_len=self.max_map,
            max_ext_len=0,
            list_hook=count,
            object_hook=count,
        )


class RemoteError(Exception):
    """An error frame from the daemon: ``code`` is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode_frame(meta: Any) -> bytes:
    """``meta`` as the bytes of one frame: its length, then its msgpack."""
    raw = msgpack.packb(meta)
    return _LEN.pack(len(raw)) + raw


def send_frame(sock: socket.socket, meta: dict[str, Any], *payloads: Any) -> None:
    """Send one frame, then ``payloads`` (buffers) back to back."""
    send_buffers(sock, [encode_frame(meta), *payloads])


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` (a writable byte view) from the socket."""
    got, n = 0, view.nbytes
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if not r:
            raise StreamClosed("stream closed mid-payload")
        got += r


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """``recv_into`` asking the kernel for the whole view at once (``MSG_WAITALL``): one
    system call, and one GIL round trip, per buffer rather than per socket-buffer load."""
    got, n = 0, view.nbytes
    while got < n:
        r = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if not r:
            raise StreamClosed("stream closed mid-payload")
        got += r


SEND_BYTES = 1 << 20
"""Bytes handed to one ``sendmsg``. Loopback TCP moved 1 MiB chunks at 2.6 GB/s when
a whole 4 MiB part went in one call and at 3.5 GB/s in 1 MiB calls (2.5 at 256 KiB or
2 MiB); the sender's kernel time per byte drops too: each call's data stays within the
core's 2 MiB L2 while the stack copies it (docs/daemon.md)."""


def send_buffers(sock: socket.socket, buffers: Sequence[Any]) -> None:
    """``sendall`` of many buffers with few system calls (gathered ``sendmsg``)."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
    # Only a kernel socket gains from short calls; a UcxSocket waits for each call's
    # completion, so it gets everything at once.
    limit = SEND_BYTES if isinstance(sock, socket.socket) else 1 << 62
    i = 0
    while i < len(views):
        sent = sock.sendmsg(_batch(views, i, limit))
        i = advance_views(views, i, sent)


def _batch(views: list[memoryview], i: int, limit: int) -> list[memoryview]:
    """``views[i:]`` cut to at most ``limit`` bytes (and IOV_MAX buffers) for one call."""
    batch: list[memoryview] = []
    size = 0
    for v in views[i : i + IOV_MAX]:
        if v.nbytes > limit - size:
            batch.append(v[: limit - size])
            break
        batch.append(v)
        size += v.nbytes
        if size == limit:
            break
    return batch


def recv_buffers(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Fill writable byte views in order with few system calls (scattered ``recvmsg_into``,
    ``MSG_WAITALL``: one call per batch of views, not one per socket-buffer load)."""
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        got = sock.recvmsg_into(views[i : i + IOV_MAX], 0, socket.MSG_WAITALL)[0]
        if not got:
            raise StreamClosed("stream closed mid-payload")
        i = advance_views(views, i, got)


def advance_views(views: list[memoryview], i: int, n: int) -> int:
    """Drop ``n`` done bytes from ``views[i:]``; the index of the first unfinished view."""
    while n and i < len(views):
        if n >= views[i].nbytes:
            n -= views[i].nbytes
            i += 1
        else:
            views[i] = views[i][n:]
            n = 0
    return i


def recv_bytes(sock: socket.socket, n: int) -> bytearray:
    """The next ``n`` bytes. The buffer grows as they arrive (FIRST_READ_BYTES, then
    doubling): a peer that declares a length and sends less costs what it sent."""
    buf = bytearray(min(n, FIRST_READ_BYTES))
    recv_into(sock, memoryview(buf))
    while (got := len(buf)) < n:
        buf += bytes(min(n - got, got))
        recv_into(sock, memoryview(buf)[got:])
    return buf


def recv_frame(sock: socket.socket, limits: FrameLimits | None = None) -> dict[str, Any]:
    """The next frame's meta; raises StreamClosed at end of stream, BadFrame on garbage or
    a frame over ``limits`` (None: only MAX_META_BYTES, and msgpack's own bounds)."""
    head = bytearray(_LEN.size)
    view = memoryview(head)
    r = sock.recv_into(view)
    if not r:
        raise StreamClosed("stream closed")
    if r < _LEN.size:
        recv_into(sock, view[r:])
    (n,) = _LEN.unpack(head)
    max_bytes = MAX_META_BYTES if limits is None else limits.max_bytes
    if n > max_bytes:
        raise BadFrame(f"frame of {n} bytes exceeds {max_bytes}")
    raw = recv_bytes(sock, n)
    try:
        meta = msgpack.unpackb(raw) if limits is None else limits.decode(raw)
    except Exception as exc:  # msgpack raises many types on garbage
        raise BadFrame(f"unreadable frame: {exc}") from None
    if not isinstance(meta, dict):
        raise BadFrame("frame is not a map")
    return meta


def check_reply(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` unless it is an error frame, which raises RemoteError."""
    if "error" in meta:
        raise RemoteError(str(meta["error"]), str(meta.get("message", "")))
    return meta


def tune(sock: socket.socket) -> None:
    """No Nagle delay for small frames; large buffers for bulk payloads."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
