"""The client's bulk paths behind one interface, and what they share.

``KVStoreClient`` (client.py) picks a ``Transport`` by name and, for the paths that need
one, lends it a stream connection (``Conn``): stream.py (payloads on the socket, also
over UCX), shm.py (shared memory on the same host: region, the daemon's pool, cross-
memory attach) and grpc_bulk.py (payloads inline in gRPC messages). A transport fills
``results`` for a get, returns per-chunk answers for a put, and raises RemoteError or
OSError; the client maps those, retries stale connections and splits puts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kvcore.buffers import flat_bytes, host_array
from kvcore.chunk import Chunk, ChunkError, decode_header, on_device
from kvcore.shared_memory import PoolMapping
from store.wire.shm import Region
from store.wire.stream import RemoteError, check_reply, recv_frame

_HEADER_CACHE = 1 << 16
_headers: dict[bytes, Any] = {}
"""Headers of recent hits by their exact bytes: parsing one (msgpack, then a dataclass)
costs about as much as receiving 16 KiB, and the same chunks are read again and again.
Equal bytes parse to the same immutable header, so a hit is never stale."""


class Conn:
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


class Transport:
    """One bulk path. ``conn`` is a borrowed stream connection (None where
    ``needs_conn`` is False); ``results[i]`` gets key ``i``'s chunk, its payload in
    ``outs[i]`` where given and large enough."""

    needs_conn = True

    def get(
        self, conn: Conn | None, keys: list[str], outs: Any, fp: bytes | None, results: Any
    ) -> None:
        raise NotImplementedError

    def put(self, conn: Conn | None, chunks: Sequence[Chunk], fp: bytes | None) -> list[bool]:
        """Store one request's chunks (within the daemon's limits: the client splits)."""
        raise NotImplementedError


class Offset:
    """A view of ``results`` from ``start`` (for finishing a get on another path)."""

    def __init__(self, results: Any, start: int) -> None:
        self.results, self.start = results, start

    def __setitem__(self, i: int, v: Any) -> None:
        self.results[self.start + i] = v


def replies(sock: Any) -> Iterator[dict[str, Any]]:
    """The frames of one answer: parts, then the final ``ok`` frame (an error frame raises)."""
    while True:
        meta = check_reply(recv_frame(sock))
        yield meta
        if "part" not in meta:
            return


def header(raw: Any, index: Any, n: int) -> Any:
    """The header a daemon sent for key ``index`` of ``n`` (parsed once per distinct bytes)."""
    if not isinstance(index, int) or not 0 <= index < n:
        raise RemoteError("INTERNAL", f"daemon answered for key index {index!r} of {n}")
    global _headers  # noqa: PLW0603 (rebound when full)
    hit = _headers.get(raw) if isinstance(raw, bytes) else None
    if hit is not None:
        return hit
    try:
        parsed = decode_header(raw)[0]
    except ChunkError as exc:
        raise RemoteError("INTERNAL", f"daemon sent an unreadable header: {exc}") from None
    if isinstance(raw, bytes):
        if len(_headers) >= _HEADER_CACHE:
            _headers = {}
        _headers[raw] = parsed
    return parsed


def destination(outs: Any, index: int, nbytes: int) -> tuple[np.ndarray, Any]:
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


def deliver(dst: np.ndarray, device_out: Any, nbytes: int) -> Any:
    """The payload as the caller sees it: ``dst``, or copied on into its device tensor."""
    if device_out is None:
        return dst
    target = flat_bytes(device_out)[:nbytes]
    import torch

    target.copy_(torch.from_numpy(dst))
    return target


def tail(outs: Any, start: int) -> Any:
    return None if outs is None else list(outs)[start:]
