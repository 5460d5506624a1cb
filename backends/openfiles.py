"""Read descriptors of chunk files kept open between gets: a bounded LRU of file descriptors.

Why: a disk get of a small chunk from the page cache is mostly system calls, and
``open`` + ``close`` cost about as much as the ``preadv`` of a 64 KiB payload. Keeping
the descriptors of recently read chunk files open (as nginx's ``open_file_cache`` and
RocksDB's table cache do) makes a repeated read one ``preadv``.

Why it is safe: a chunk file never changes once renamed into place (keys name content).
A descriptor reads the inode it was opened on, so a file replaced by another writer
(another process sharing the directory) still reads the complete copy it was opened
on, under the same key: the same bytes. A file truncated or overwritten in place is
seen through the descriptor as through a fresh open, and the payload's xxh3 check
catches it. The tier ``forget``s a key it drops, evicts or deletes.

A descriptor is never closed while a reader holds it: a closed number can be handed
out again by the next ``open``, and a reader still holding the old number would read
another file. ``borrow`` counts readers; a descriptor evicted or forgotten while held is
closed by the last ``release``.
"""

from __future__ import annotations

import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Sequence


def default_limit(wanted: int) -> int:
    """``wanted`` descriptors, capped at a quarter of the process's soft open-file limit
    (the rest stays for sockets, other tiers and the engine)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(0, min(wanted, soft // 4))


class OpenFiles:
    """At most ``limit`` open read descriptors, one per key, least recently used closed
    first. ``limit`` 0 keeps none (every get opens and closes). Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = default_limit(limit)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._readers: dict[int, int] = {}
        self._doomed: set[int] = set()  # evicted or forgotten while held: closed on release
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._fds)

    def borrow(self, keys: Sequence[str]) -> list[int | None]:
        """The open descriptor of each key (None: not open); each one returned is held
        until ``release``."""
        fds = self._fds
        if not fds:
            return [None] * len(keys)
        with self._lock:
            found = [fds.get(k) for k in keys]
            readers = self._readers
            for key, fd in zip(keys, found, strict=True):
                if fd is not None:
                    fds.move_to_end(key)
                    readers[fd] = readers.get(fd, 0) + 1
        return found

    def release(self, held: Sequence[int | None], opened: Sequence[tuple[str, int]]) -> None:
        """Give back descriptors from ``borrow`` and hand over ``opened`` ones (key,
        descriptor: opened by the caller for this batch, to keep or close)."""
        closing: list[int] = []
        with self._lock:
            readers = self._readers
            for fd in held:
                if fd is None:
                    continue
                n = readers[fd] - 1
                if n:
                    readers[fd] = n
                    continue
                del readers[fd]
                if fd in self._doomed:
                    self._doomed.discard(fd)
                    closing.append(fd)
            for key, fd in opened:
                if self.limit == 0 or key in self._fds:
                    closing.append(fd)  # another reader kept its own first
                    continue
                self._fds[key] = fd
            while len(self._fds) > self.limit:
                _, fd = self._fds.popitem(last=False)
                self._retire(fd, closing)
        for fd in closing:
            os.close(fd)

    def forget(self, key: str) -> None:
        """Close ``key``'s descriptor (now, or when its last reader releases it)."""
        if key not in self._fds:  # unlocked peek: a key not open cannot become open here
            return  # ...except by a get that raced its drop; that one is closed by LRU
        closing: list[int] = []
        with self._lock:
            fd = self._fds.pop(key, None)
            if fd is not None:
                self._retire(fd, closing)
        for fd in closing:
            os.close(fd)

    def close(self) -> None:
        """Close every descriptor not held (held ones close on release)."""
        closing: list[int] = []
        with self._lock:
            while self._fds:
                self._retire(self._fds.popitem()[1], closing)
        for fd in closing:
            os.close(fd)

    def _retire(self, fd: int, closing: list[int]) -> None:
        if fd in self._readers:
            self._doomed.add(fd)
        else:
            closing.append(fd)
