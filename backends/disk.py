"""Local disk tier: one file per chunk, written atomically, bounded by a byte budget.

* A chunk is written to a temporary name in its final directory and renamed over the
  final name with ``os.replace``, so a crash leaves a stray temp file (removed on the
  next start), never a half chunk under a real name; concurrent writers of one key (in
  this or another process) each rename a complete file, and the last one wins.
* The chunk prefix and header are padded to 4 KiB, so the payload starts page-aligned:
  a reader fetches header and payload with one ``preadv`` straight into the caller's
  buffer, and the optional O_DIRECT path can read the payload without the page cache.
* The index (key -> file size) is rebuilt from the directory on start: a restarted
  process keeps its disk hits. Truncated or unreadable files are dropped there, and on
  read (reported as ``Corrupt``).
* A get into host memory is one ``preadv`` per chunk (header page and payload, straight
  into the caller's buffer; the payload alone once the header is known), and the
  payload's xxh3 is checked as it lands (a ``CheckedChunk``: the store does not hash it
  again). A mismatch, like a truncated file, is ``Corrupt`` and the file is dropped.
  Descriptors of recently read files stay open (``open_files``, backends/openfiles.py
  says why that is safe): a hot chunk costs no ``open``/``close``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from backends.base import Backend, Corrupt, GetResult, Usage
from backends.diskio import (
    RDONLY,
    read_chunk_at,
    read_chunk_file,
    scan_chunk_files,
    write_chunk_file,
)
from backends.openfiles import OpenFiles
from backends.pins import PinCounts
from backends.policy import POLICIES
from kvcore.buffers import flat_bytes, host_array
from kvcore.chunk import HEADER_READ_SIZE, Chunk, ChunkError, HeaderCache, on_device

log = logging.getLogger(__name__)
SUFFIX = ".kvc"
_U8 = np.dtype(np.uint8)


class DiskBackend(Backend):
    """Chunk files under ``path`` using at most ``capacity`` bytes."""

    name = "disk"
    bounded = True
    parallel_io = True

    def __init__(
        self,
        path: str,
        capacity: int,
        policy: str = "s3fifo",
        fsync: bool = True,
        o_direct: bool = False,
        open_files: int = 1024,
    ) -> None:
        self.root = os.path.abspath(path)
        self.capacity = capacity
        self.fsync = fsync
        self.o_direct = o_direct
        os.makedirs(self.root, exist_ok=True)
        self.policy = POLICIES[policy](capacity)
        self._sizes: dict[str, int] = {}
        self._writing: set[str] = set()
        self._pins = PinCounts()
        self._headers = HeaderCache()
        self._open = OpenFiles(open_files)  # read descriptors kept between gets
        # ``_read``'s host-buffer fast path stands in for this class's ``_read_file`` only.
        self._fast = not o_direct and type(self)._read_file is DiskBackend._read_file
        self._used = 0
        self._lock = threading.Lock()
        self.on_evict = None
        self.evictions = 0
        self.dropped_on_start = self._rebuild_index()

    def path_of(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}{SUFFIX}"

    def _rebuild_index(self) -> int:
        """Index the files already here, oldest first; returns how many were dropped."""
        found, dropped = scan_chunk_files(self.root, SUFFIX)
        for key, size in found:
            if self._used + size > self.capacity:
                os.unlink(self.path_of(key))  # the budget shrank since the last run
                dropped += 1
                continue
            self._sizes[key] = size
            self._used += size
            self.policy.insert(key, size)
        if found or dropped:
            log.info(
                "disk tier %s: indexed %d chunks, dropped %d", self.root, len(self._sizes), dropped
            )
        return dropped

    # -- put ------------------------------------------------------------------------
    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        return [self._put_one(c) for c in chunks]

    def _put_one(self, chunk: Chunk) -> bool:
        key = chunk.header.key
        size = write_size = chunk_file_size(chunk)
        with self._lock:
            if key in self._sizes or key in self._writing:
                return True  # keys name content: the stored (or in-flight) copy is this one
            if not self._reserve(write_size):
                return False
            self._writing.add(key)
        final = self.path_of(key)
        tmp = os.path.join(os.path.dirname(final), f".{key}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            size = self._write_file(tmp, chunk)
            os.replace(tmp, final)
        except OSError as exc:  # ENOSPC, EIO, read-only fs: a failed write, not a crash
            log.warning("disk tier: writing chunk %s failed: %s", key[:12], exc)
            _unlink_quietly(tmp)
            with self._lock:
                self._writing.discard(key)
                self._used -= write_size
            return False
        with self._lock:
            self._writing.discard(key)
            self._used += size - write_size
            self._sizes[key] = size
            self.policy.insert(key, size)
        self._headers.remember(key, chunk.header, HEADER_READ_SIZE)
        return True

    def _reserve(self, size: int) -> bool:
        """Count ``size`` bytes as used, evicting as needed (lock held)."""
        if size > self.capacity:
            return False
        while self._used + size > self.capacity:
            victim = self.policy.victim(self._pins.__contains__)
            if victim is None:
                return False
            self._evict(victim)
        self._used += size
        return True

    def _evict(self, key: str) -> None:
        if self.on_evict is not None:
            # The lock is held here: read directly, not via _read (which takes it).
            try:
                self.on_evict(self._read_file(self.path_of(key), None))
            except (OSError, ChunkError) as exc:
                log.warning("demoting chunk %s from disk: unreadable (%s)", key[:12], exc)
            except Exception:
                log.warning("demoting chunk %s from disk failed", key[:12], exc_info=True)
        self._drop(key)
        self.evictions += 1

    def _drop(self, key: str) -> None:
        size = self._sizes.pop(key, None)
        if size is None:
            return
        self._used -= size
        self.policy.remove(key)
        self._headers.forget(key)
        self._open.forget(key)
        _unlink_quietly(self.path_of(key))

    # -- get ------------------------------------------------------------------------
    def get(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> list[GetResult]:
        outs = outs if outs is not None else [None] * len(keys)
        with self._lock:  # one lock round for the batch's bookkeeping
            present = [key in self._sizes for key in keys]
            for key, here in zip(keys, present, strict=True):
                if here:
                    self.policy.touch(key)
        head = bytearray(HEADER_READ_SIZE)  # one scratch header page for the batch
        if not self._fast:
            return [
                self._read(key, out, head, None, []) if here else None
                for key, out, here in zip(keys, outs, present, strict=True)
            ]
        held = self._open.borrow([k for k, here in zip(keys, present, strict=True) if here])
        opened: list[tuple[str, int]] = []  # descriptors this batch opened: kept or closed
        fds = iter(held)
        try:
            return [
                self._read(key, out, head, next(fds), opened) if here else None
                for key, out, here in zip(keys, outs, present, strict=True)
            ]
        finally:
            self._open.release(held, opened)

    def _read(self, key: str, out: Any, head: bytearray, fd: int | None, opened: list) -> GetResult:
        """Read ``key`` through its open descriptor ``fd``, or open its file (appending
        the new descriptor to ``opened`` once a read through it succeeded)."""
        path = f"{self.root}/{key[:2]}/{key}{SUFFIX}"  # path_of, inlined: this runs per chunk
        try:
            dst = _host_bytes(out) if self._fast else None
            if dst is None:
                return self._read_file(path, out)
            if fd is not None:
                return read_chunk_at(fd, key, dst, self._headers, head)
            fd = os.open(path, RDONLY)
            try:
                chunk = read_chunk_at(fd, key, dst, self._headers, head)
            except BaseException:
                os.close(fd)
                raise
            opened.append((key, fd))
            return chunk
        except FileNotFoundError:  # evicted or deleted between index check and open
            with self._lock:
                self._drop(key)
            return None
        except ChunkError as exc:
            log.warning("disk tier: dropping unreadable chunk file %s: %s", key[:12], exc)
            with self._lock:
                self._drop(key)
            return Corrupt(key, str(exc))
        except OSError as exc:
            log.warning("disk tier: reading chunk %s failed: %s", key[:12], exc)
            return None

    def _write_file(self, path: str, chunk: Chunk) -> int:
        """Create ``path`` holding ``chunk``; returns its size. The GDS tier overrides this."""
        return write_chunk_file(path, chunk, fsync=self.fsync, o_direct=self.o_direct)

    def _read_file(self, path: str, out: Any) -> Chunk:
        """The chunk in ``path``, payload into ``out`` if given. The GDS tier overrides this.

        The general path (O_DIRECT, device or no buffer): the store checks the checksum.
        Host buffers take ``read_chunk_at`` in ``_read``, which checks it as bytes land."""
        buf = flat_bytes(out) if out is not None else None
        return read_chunk_file(path, buf, o_direct=self.o_direct)

    # -- the rest -------------------------------------------------------------------
    def contains(self, keys: Sequence[str]) -> int:
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._sizes:
                    return i
        return len(keys)

    def delete(self, keys: Sequence[str]) -> int:
        with self._lock:
            present = [k for k in keys if k in self._sizes]
            for key in present:
                self._drop(key)
        return len(present)

    def pin(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._pins.pin(keys)

    def unpin(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._pins.unpin(keys)

    def usage(self) -> Usage:
        with self._lock:
            return Usage(len(self._sizes), self._used, self.capacity)

    def close(self) -> None:
        """Close the kept read descriptors; the files stay for the next start."""
        self._open.close()

    def check_integrity(self) -> None:
        """Raise unless the byte count matches the index and every indexed file exists."""
        with self._lock:
            if self._writing:
                return  # reservations in flight make the sum legitimately differ
            if sum(self._sizes.values()) != self._used:
                raise AssertionError(
                    f"index holds {sum(self._sizes.values())} bytes, counter {self._used}"
                )
            missing = [k for k in self._sizes if not os.path.exists(self.path_of(k))]
            if missing:
                raise AssertionError(f"{len(missing)} indexed chunk files are missing")


def chunk_file_size(chunk: Chunk) -> int:
    """Bytes a chunk file takes: the 4 KiB-padded header, then the payload."""
    return HEADER_READ_SIZE + chunk.header.nbytes


def _host_bytes(out: Any) -> np.ndarray | None:
    """``out`` as a flat uint8 host array, or ``None`` if absent or in device memory."""
    if type(out) is np.ndarray:
        return out if out.ndim == 1 and out.dtype is _U8 else host_array(out)
    if out is None or on_device(out):
        return None
    return host_array(flat_bytes(out))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
