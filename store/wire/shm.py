"""Shared-memory regions between a kvstore client and the daemon on the same host.

A client creates a region (a file in ``/dev/shm``, mapped), tells the daemon its name
and a random nonce written at its start, and the daemon opens the same file. If the
daemon reads the nonce back, both run on one host and bulk data can skip the network.
First-tier hits are then read by the client straight from the daemon's shared pool
(store/wire/same_host.py) and puts are read by the daemon straight from the client's
memory where the system allows (store/wire/cma.py); everything else crosses the region: the
daemon copies payloads from its tiers into it and the client copies them out, or the
reverse for a put.

Why a named file and not ``multiprocessing.shared_memory``: Python 3.11's attaching
side registers the segment with its resource tracker, which unlinks it when *that*
process exits; the daemon must never remove a client's memory. The client unlinks the
name as soon as the daemon has opened it, so a client killed with -9 leaks nothing.

Why the daemon never maps a region (``RegionFile``): the client owns the file and can
shrink it (``ftruncate``) at any moment. A daemon touching its mapping past the new end
would die of SIGBUS, and no check beforehand closes the race. ``preadv``/``pwritev`` on
the descriptor see a short file instead, which is an error for that one request. It
costs the daemon one more copy on region gets (through a private buffer), none on puts
(read straight into the store's pages).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvcore.shared_memory import unmap
from store.wire.stream import IOV_MAX, advance_views

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
NAME = re.compile(r"kvstore-[0-9a-f]{32}")  # fullmatch
NONCE_BYTES = 16


class RegionError(ValueError):
    """A region name or size a daemon refuses, or a file that is not a usable region."""


class Region:
    """``size`` bytes of memory mapped from ``SHM_DIR/name``; ``array`` is a uint8 view."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.size = size
        self.cma = False  # client side: the daemon can read this process's memory
        self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        os.close(fd)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    @classmethod
    def create(cls, size: int) -> Region:
        """A new region of ``size`` bytes, its first bytes a fresh nonce (client side)."""
        name = f"kvstore-{secrets.token_hex(16)}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(size, NONCE_BYTES))
        except OSError:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, name))
            raise
        region = cls(name, fd, max(size, NONCE_BYTES))
        region.array[:NONCE_BYTES] = np.frombuffer(secrets.token_bytes(NONCE_BYTES), np.uint8)
        return region

    @property
    def nonce(self) -> bytes:
        return bytes(self.array[:NONCE_BYTES])

    def unlink(self) -> None:
        """Remove the name; the mapping stays valid in every process that has it."""
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap. Views still held elsewhere keep the memory alive until they go."""
        m, self._mmap = self._mmap, None
        self.array = np.empty(0, dtype=np.uint8)
        unmap(m)


class RegionFile:
    """A client's region as the daemon holds it: the open file, never a mapping (see the
    module's docstring). Reads and writes name byte offsets in the file."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name, self.size, self._fd = name, size, fd
        self.nonce = os.pread(fd, NONCE_BYTES, 0)

    @classmethod
    def attach(cls, name: Any, max_size: int) -> RegionFile:
        """Open the client region ``name``; refuses foreign names and sizes."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RegionError(f"region name {name!r} is not of the form kvstore-<32 hex>")
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionError(f"region {name} cannot be opened here: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if not NONCE_BYTES <= size <= max_size:
                raise RegionError(
                    f"region {name} is {size} bytes; allowed {NONCE_BYTES}-{max_size}"
                )
            return cls(name, fd, size)
        except BaseException:
            os.close(fd)
            raise

    def read(self, offset: int, buffers: Sequence[Any]) -> None:
        """Fill ``buffers`` (writable byte views) from ``offset`` on."""
        views = _views(buffers)
        if _transfer(os.preadv, self._fd, views, offset) < sum(v.nbytes for v in views):
            raise RegionError(f"region {self.name} shrank below {offset}+: the client cut it")

    def write(self, offset: int, buffers: Sequence[Any]) -> None:
        """Write ``buffers`` at ``offset``; refused if the file no longer reaches so far
        (writing would grow a file the client cut, at the daemon's expense)."""
        views = _views(buffers)
        end = offset + sum(v.nbytes for v in views)
        if os.fstat(self._fd).st_size < end:
            raise RegionError(f"region {self.name} shrank below {end}: the client cut it")
        _transfer(os.pwritev, self._fd, views, offset)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _views(buffers: Sequence[Any]) -> list[memoryview]:
    views = (
        b if type(b) is memoryview and b.format == "B" else memoryview(b).cast("B") for b in buffers
    )
    return [v for v in views if v.nbytes]


def _transfer(call: Any, fd: int, views: list[memoryview], offset: int) -> int:
    """``preadv``/``pwritev`` of all of ``views`` at ``offset``, resuming after partial
    transfers; the byte count moved (short only at the end of the file)."""
    done = i = 0
    while i < len(views):
        n = call(fd, views[i : i + IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
        i = advance_views(views, i, n)
    return done
