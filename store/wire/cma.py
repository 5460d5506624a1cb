"""Cross-memory attach: the daemon copies a same-host client's put payloads straight out
of the client's memory with ``process_vm_readv``.

Why: a shared-memory put used to be two copies (the client into its region, the daemon
from the region into its pool), and a socket put is two copies plus the TCP stack. Read
across processes, it is one copy, from the caller's buffer into the pool pages reserved
for the chunk, which the daemon then verifies against the chunk's checksum as always.
UCX's ``cma`` transport and Open MPI's shared-memory path use the same system call.

When it is allowed: Linux lets a process read another's memory when it may ``ptrace``
it (same user, and Yama's ``ptrace_scope`` permitting; containers may also filter the
call). So the daemon never assumes. Which process to read is the kernel's word, not
the client's: the pid of whoever redeemed the connection's ticket at the daemon's
same-host door (``SO_PEERCRED``, store/wire/same_host.py). The daemon then reads the
region's nonce at the address where the client says it has the region mapped; only if
those bytes come back does the connection use this path, otherwise puts go through the
region.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

IOV_MAX = 1024  # iovecs per side of one call (Linux's UIO_MAXIOV)
REFUSED = "cannot read the payloads from the client's memory"
"""The daemon's one message for a put it could not read this way, whatever the cause (no
oracle on memory); a client that sees it sends its payloads instead."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    return fn


_readv = _load()


def available() -> bool:
    """Whether this system has ``process_vm_readv`` at all (Linux with glibc)."""
    return _readv is not None


def address(buf: Any) -> int:
    """The address of a contiguous host buffer in this process (a daemon takes one per
    chunk: ctypes' view of a writable buffer costs a sixth of numpy's)."""
    view = memoryview(buf)
    if not view.nbytes:
        return 0
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def read(pid: int, local: Sequence[Any], remote: Sequence[tuple[int, int]]) -> None:
    """Fill the writable buffers ``local`` in order with the bytes of ``remote``
    (``(address, nbytes)`` ranges of process ``pid``), back to back; the totals must
    match. Raises OSError (EFAULT for a range the process has not mapped, EPERM or
    ESRCH when its memory cannot be read)."""
    if _readv is None:
        raise OSError("process_vm_readv is not available here")
    dst = [(address(b), memoryview(b).nbytes) for b in local]
    src = [r for r in remote if r[1]]
    dst = [d for d in dst if d[1]]
    if sum(n for _, n in dst) != sum(n for _, n in src):
        raise ValueError("local and remote ranges differ in size")
    while dst:  # both sides hold the same number of bytes, none of them empty
        ldst, lsrc = dst[:IOV_MAX], src[:IOV_MAX]
        got = _readv(pid, _iovecs(ldst), len(ldst), _iovecs(lsrc), len(lsrc), 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv from pid {pid}: {os.strerror(err)}")
        if got == 0:
            raise OSError(f"process_vm_readv from pid {pid} read nothing")
        _drop(dst, got)
        _drop(src, got)


def _iovecs(ranges: list[tuple[int, int]]) -> Any:
    arr = (_Iovec * len(ranges))()
    for i, (addr, n) in enumerate(ranges):
        arr[i].iov_base = addr
        arr[i].iov_len = n
    return arr


def _drop(ranges: list[tuple[int, int]], n: int) -> None:
    """Remove ``n`` done bytes from the front of ``ranges`` (in place)."""
    i = 0
    while n and i < len(ranges):
        addr, size = ranges[i]
        if n >= size:
            n -= size
            i += 1
        else:
            ranges[i] = (addr + n, size - n)
            n = 0
    del ranges[:i]
