"""File I/O of chunk files for the disk and gds tiers: atomic-ready writes, one-call reads.

Layout of a chunk file: the encoded prefix and header, zero-padded to ``HEADER_READ_SIZE``
(4 KiB), then the payload. Writes go out with one ``writev`` (no join copy of header and
payload); reads come in with one ``preadv`` (header page and payload into the caller's
buffer). O_DIRECT, when asked for and supported, stages through a page-aligned buffer.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from typing import Any

import numpy as np
from xxhash import xxh3_64_intdigest as xxh3

from kvcore.buffers import host_array
from kvcore.chunk import (
    HEADER_READ_SIZE,
    CheckedChunk,
    Chunk,
    ChunkError,
    HeaderCache,
    checked,
    decode_header,
    encode_prefix,
    host_view,
    on_device,
)

log = logging.getLogger(__name__)
_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
RDONLY = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_new = tuple.__new__  # a NamedTuple without its Python-level __new__ (hot path)
_direct_unsupported: set[str] = set()  # directories whose filesystem rejected O_DIRECT


def _writev_all(fd: int, buffers: list[Any]) -> int:
    """Write every byte of ``buffers``; ``writev`` may write less than asked."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = 0
    while views:
        n = os.writev(fd, views)
        total += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def _open_direct(path: str, flags: int) -> int | None:
    """An O_DIRECT descriptor, or ``None`` where the filesystem refuses it (tmpfs)."""
    folder = os.path.dirname(path)
    if not _O_DIRECT or folder in _direct_unsupported:
        return None
    try:
        return os.open(path, flags | _O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        log.warning("O_DIRECT unsupported under %s; using buffered I/O there", folder)
        _direct_unsupported.add(folder)
        return None


def write_chunk_file(path: str, chunk: Chunk, *, fsync: bool = True, o_direct: bool = False) -> int:
    """Create ``path`` (must not exist) holding ``chunk``; returns the file size."""
    prefix = encode_prefix(chunk.header, align=HEADER_READ_SIZE)
    payload = host_view(chunk.payload)
    size = len(prefix) + payload.nbytes
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = _open_direct(path, flags) if o_direct else None
    direct = fd is not None
    if fd is None:
        fd = os.open(path, flags, 0o644)
    try:
        if direct:
            staged = mmap.mmap(-1, -(-size // _ALIGN) * _ALIGN)  # page-aligned, zeroed
            staged[: len(prefix)] = prefix
            staged[len(prefix) : size] = payload
            _writev_all(fd, [staged])
            os.ftruncate(fd, size)  # drop the alignment padding of the last block
            staged.close()
        else:
            _writev_all(fd, [prefix, payload])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return size


def read_chunk_at(
    fd: int, key: str, dst: np.ndarray, headers: HeaderCache, head: bytearray
) -> CheckedChunk:
    """Read the chunk of ``key`` in open file ``fd`` into ``dst`` (a flat uint8 host
    array), checked.

    The fast path of a disk get: one ``preadv``; no ``fstat`` (a short read is a
    truncated file); the xxh3 taken at once, while the payload is still in the CPU
    caches. The ``preadv`` reads the payload alone when ``headers`` knows the key's
    header (written or read by this process), else the header page too (into ``head``,
    a ``HEADER_READ_SIZE`` scratch buffer).
    Raises ChunkError if truncated, foreign or corrupt.
    """
    known = headers.known(key)
    if known is not None and known[0].nbytes == dst.nbytes:  # the common case, inlined
        header, offset = known
        n = os.preadv(fd, [dst], offset)
        if n == header.nbytes and xxh3(dst) == header.checksum:
            return _new(CheckedChunk, (header, dst))
        n += offset
    elif known is not None and known[0].nbytes < dst.nbytes:
        header, offset = known
        n = offset + os.preadv(fd, [dst[: header.nbytes]], offset)
    else:
        n = os.preadv(fd, [head, dst], 0)
        header, offset = headers.decode(key, head if n >= HEADER_READ_SIZE else head[:n])
        if offset != HEADER_READ_SIZE and header.nbytes <= dst.nbytes:
            # Written with another alignment: the payload starts elsewhere.
            n = offset + os.preadv(fd, [dst[: header.nbytes]], offset)
    size = header.nbytes
    if n < offset + size:
        if size > dst.nbytes:
            raise ValueError(f"buffer of {dst.nbytes} bytes is too small for a {size}-byte chunk")
        raise ChunkError(f"chunk file truncated: {n} bytes, needs {offset + size}")
    return checked(header, dst if size == dst.nbytes else dst[:size])


def read_chunk_file(path: str, out: Any | None = None, *, o_direct: bool = False) -> Chunk:
    """Read the chunk in ``path``, the payload into ``out`` if given (flat uint8 buffer).

    Raises FileNotFoundError if absent, ChunkError if truncated or not a chunk file.
    """
    fd = _open_direct(path, os.O_RDONLY) if o_direct else None
    if fd is not None:
        try:
            return _read_direct(fd, out)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        head = bytearray(HEADER_READ_SIZE)
        staging = out is None or not _host_writable(out)
        dst = (
            np.empty(max(size - HEADER_READ_SIZE, 0), dtype=np.uint8)
            if staging
            else host_array(out)
        )
        n = os.preadv(fd, [head, dst], 0)
        header, offset = decode_header(memoryview(head)[: min(n, HEADER_READ_SIZE)])
        if offset + header.nbytes > size:
            raise ChunkError(f"chunk file truncated: {size} bytes, needs {offset + header.nbytes}")
        if header.nbytes > dst.nbytes:
            raise ValueError(
                f"buffer of {dst.nbytes} bytes is too small for a {header.nbytes}-byte chunk"
            )
        if offset != HEADER_READ_SIZE:  # written with another alignment: payload elsewhere
            os.preadv(fd, [dst[: header.nbytes]], offset)
        payload = dst[: header.nbytes]
    finally:
        os.close(fd)
    return Chunk(header, _deliver(payload, out, staging))


def _read_direct(fd: int, out: Any | None) -> Chunk:
    size = os.fstat(fd).st_size
    staged = mmap.mmap(-1, max(-(-size // _ALIGN) * _ALIGN, _ALIGN))
    n = os.preadv(fd, [staged], 0)
    view = memoryview(staged)[:n]
    header, offset = decode_header(view[:HEADER_READ_SIZE])
    if offset + header.nbytes > n:
        raise ChunkError(f"chunk file truncated: {n} bytes, needs {offset + header.nbytes}")
    payload = np.frombuffer(staged, dtype=np.uint8, count=header.nbytes, offset=offset).copy()
    del view
    staged.close()
    if out is None:
        return Chunk(header, memoryview(payload))
    return Chunk(header, _deliver(payload, out, True))


def _host_writable(out: Any) -> bool:
    return not on_device(out)


def _deliver(payload: np.ndarray, out: Any | None, staged: bool) -> Any:
    """The payload as the caller will see it: a view of ``out`` when one was given."""
    if out is None:
        return memoryview(payload)
    if not staged:
        return out[: payload.nbytes]
    if out.nbytes < payload.nbytes:
        raise ValueError(
            f"buffer of {out.nbytes} bytes is too small for a {payload.nbytes}-byte chunk"
        )
    import torch

    dst = out[: payload.nbytes]
    dst.copy_(torch.from_numpy(payload)) if isinstance(dst, torch.Tensor) else np.copyto(
        host_array(dst), payload
    )
    return dst


def scan_chunk_files(root: str, suffix: str) -> tuple[list[tuple[str, int]], int]:
    """(key, size) of every intact chunk file under ``root``, oldest first, and how many
    unreadable, truncated or temporary files were removed."""
    found: list[tuple[float, str, int]] = []
    dropped = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".tmp"):  # a write that never reached its rename
                os.unlink(path)
                dropped += 1
            elif name.endswith(suffix):
                entry = _check_file(path, name[: -len(suffix)])
                if entry is None:
                    os.unlink(path)
                    dropped += 1
                else:
                    found.append(entry)
    found.sort()
    return [(key, size) for _, key, size in found], dropped


def _check_file(path: str, key: str) -> tuple[float, str, int] | None:
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            header, offset = decode_header(f.read(HEADER_READ_SIZE))
    except (OSError, ChunkError):
        return None
    if header.key != key or st.st_size != offset + header.nbytes:
        return None
    return (st.st_mtime, key, st.st_size)
