"""A cpu pool in shared memory that clients on the same host can map read-only.

Why: a daemon's same-host get used to copy each payload from its pool into the client's
region, and the client copied it again into its buffer: two copies where ``memcpy`` is
one. With the pool itself in shared memory, the daemon only pins a hit's pages and
names them; the client copies straight out of its own read-only mapping of the pool.

The memory is a ``memfd`` (anonymous, no name in any file system, freed with its last
mapping). Once the daemon has mapped it read-write, it is sealed against resizing and
against every *future* write (``F_SEAL_FUTURE_WRITE``, Linux 5.1): no new writable
mapping and no ``write`` succeed any more, for anyone, while the daemon's own mapping
stays writable. The seal is what makes the memory read-only to clients: a read-only
descriptor alone is not enough, since ``/proc/self/fd/N`` can be re-opened read-write
(a memfd's mode is 0777). Where the kernel refuses the seal the pool stays private.
Clients get a descriptor from ``reader_fd`` (read-only as well); how it reaches them:
store/wire/same_host.py.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os

import numpy as np
import torch

log = logging.getLogger(__name__)

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux 5.1; no name in 3.11


def unmap(m: mmap.mmap | None) -> None:
    """Close a mapping; if a view of it is still alive, the GC unmaps it when that goes."""
    if m is not None:
        try:
            m.close()
        except BufferError:
            log.debug("mapping still viewed at close; unmapped when the views go")


class SharedMemoryUnavailable(OSError):
    """This system has no ``memfd_create`` (not Linux) or refused the allocation."""


class SharedBuffer:
    """``nbytes`` of shared memory mapped read-write here; ``tensor`` is a uint8 view."""

    def __init__(self, nbytes: int, name: str = "kvstore-pool") -> None:
        create = getattr(os, "memfd_create", None)
        if create is None:
            raise SharedMemoryUnavailable("memfd_create is not available on this system")
        fd = create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, nbytes)  # before the write seal
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | fcntl.F_SEAL_SEAL)
        except OSError as exc:
            os.close(fd)
            raise SharedMemoryUnavailable(f"shared memory of {nbytes} bytes: {exc}") from None
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:  # honoured only where shmem THP is 'advise' or 'always'
            try:
                self._mmap.madvise(advice)
            except OSError:
                pass
        self.fd = fd
        self.nbytes = nbytes
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def reader_fd(self) -> int:
        """A new read-only descriptor of this memory (the caller closes it)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Drop this process's references and descriptor; clients' mappings stay valid.

        Not ``mmap.close()``: a tensor made by ``torch.frombuffer`` holds no buffer
        export, so closing would unmap memory that views handed out (a page being sent
        or hashed by another thread) still use. The tensor keeps the mapping alive; it
        is unmapped when the last view goes."""
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PoolMapping:
    """A client's read-only mapping of a daemon's shared pool (from ``reader_fd``)."""

    def __init__(self, fd: int, nbytes: int) -> None:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise ValueError(f"shared pool is {size} bytes, the daemon said {nbytes}")
        self._mmap: mmap.mmap | None = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        self.nbytes = nbytes
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    def read(self, runs: list[int], dst: np.ndarray) -> bool:
        """Copy the pool bytes at ``runs`` (flat ``[offset, nbytes, ...]``) into ``dst``,
        which they must fill exactly; False (nothing trusted) when they do not."""
        if len(runs) % 2 or not all(type(x) is int and x >= 0 for x in runs):
            return False
        pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
        if sum(n for _, n in pairs) != dst.nbytes or any(o + n > self.nbytes for o, n in pairs):
            return False
        pos = 0
        for off, n in pairs:
            np.copyto(dst[pos : pos + n], self.array[off : off + n])
            pos += n
        return True

    def close(self) -> None:
        m, self._mmap = self._mmap, None
        self.array = np.empty(0, dtype=np.uint8)
        unmap(m)
