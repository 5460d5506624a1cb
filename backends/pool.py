"""A preallocated byte pool cut into fixed-size pages, for the cpu and gpu tiers.

Why pages and not a heap: chunks come and go all day, and a first-fit heap over one
buffer fragments until a free total of gigabytes cannot hold one chunk. With pages any
free page serves any chunk, so the pool never fragments; a chunk is a list of pages.

Why a LIFO free list of pages pushed back in reverse: a fresh pool hands out pages
0, 1, 2, ... and a freed chunk returns its pages so that the next chunk of the same size
gets the same ascending run. Chunks of one model all have one size, so in steady state
every chunk is a single contiguous run and costs one memcpy, like a slab allocator;
mixed sizes degrade to a few runs per chunk, never to a failure::

    pages   |0|1|2|3|4|5|6|7|      chunk A = pages 0-2 (one run), B = 3-4, C = 5-7
    free B  -> free stack [..., 4, 3]  -> next alloc of 2 pages gets 3, 4 again
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch

from kvcore.buffers import as_tensor, host_array
from kvcore.shared_memory import SharedBuffer, SharedMemoryUnavailable

log = logging.getLogger(__name__)


class Run(NamedTuple):
    """``nbytes`` of a chunk's payload stored at byte ``offset`` of the pool."""

    offset: int
    nbytes: int


def pages_to_runs(pages: list[int], page_size: int, nbytes: int) -> list[Run]:
    """Coalesce consecutive page numbers into byte runs covering exactly ``nbytes``."""
    runs: list[Run] = []
    left = nbytes
    start = prev = pages[0] if pages else 0
    for p in pages[1:] + [None]:  # type: ignore[operator]
        if p is not None and p == prev + 1:
            prev = p
            continue
        size = min((prev - start + 1) * page_size, left)
        runs.append(Run(start * page_size, size))
        left -= size
        if p is not None:
            start = prev = p
    return runs if nbytes else []


def _is_device(buf: Any) -> bool:
    return isinstance(buf, torch.Tensor) and buf.device.type != "cpu"


class PagedPool:
    """``num_pages`` pages of ``page_size`` bytes in one tensor on ``device``."""

    def __init__(
        self,
        capacity: int,
        page_size: int,
        device: str = "cpu",
        pin: bool = False,
        shared: bool = False,
    ) -> None:
        if page_size < 1 or capacity < page_size:
            raise ValueError(f"pool of {capacity} bytes cannot hold one page of {page_size}")
        self.page_size = page_size
        self.num_pages = capacity // page_size
        self.device = torch.device(device)
        self.shared: SharedBuffer | None = None  # host pools others may map (shared_memory.py)
        if shared and self.device.type == "cpu" and not pin:
            try:
                self.shared = SharedBuffer(self.num_pages * page_size)
            except SharedMemoryUnavailable as exc:
                log.warning("cpu pool in private memory (%s): same-host gets copy twice", exc)
        if self.shared is not None:
            self.buf = self.shared.tensor
        else:
            self.buf = torch.empty(
                self.num_pages * page_size, dtype=torch.uint8, device=self.device, pin_memory=pin
            )
        self._host = self.buf.numpy() if self.device.type == "cpu" else None
        self._rw = None if self._host is None else memoryview(self._host).cast("B")
        self._ro = None if self._rw is None else self._rw.toreadonly()
        self._free = list(range(self.num_pages - 1, -1, -1))  # stack: pop() yields 0, 1, 2...

    @property
    def capacity(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.page_size))

    def alloc(self, nbytes: int) -> list[int] | None:
        """Pages for ``nbytes``, ascending where possible; ``None`` if too few are free."""
        n = self.pages_for(nbytes)
        if n > len(self._free):
            return None
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        return pages

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    @property
    def on_host(self) -> bool:
        """Whether the pool is host memory (``views`` can hand out its bytes)."""
        return self._host is not None

    def views(self, runs: list[Run], writable: bool) -> list[memoryview] | None:
        """The pool bytes at ``runs`` as byte memoryviews, one per run (no copy; slicing
        a memoryview costs a tenth of a numpy view, and a get hands out one per chunk);
        None for a device pool. Read-only unless ``writable``."""
        if self._host is None:
            return None
        whole = self._rw if writable else self._ro
        return [whole[off : off + n] for off, n in runs]

    def write(self, runs: list[Run], src: Any) -> None:
        """Copy ``src`` (host buffer or tensor) into the pool at ``runs``."""
        if self._host is not None and not _is_device(src):
            data = host_array(src)
            pos = 0
            for off, n in runs:
                np.copyto(self._host[off : off + n], data[pos : pos + n])
                pos += n
            return
        data = as_tensor(src)
        pos = 0
        for off, n in runs:
            self.buf[off : off + n].copy_(data[pos : pos + n], non_blocking=True)
            pos += n
        self._sync()

    def read(self, runs: list[Run], dst: Any) -> None:
        """Copy the pool bytes at ``runs`` into ``dst`` (writable host buffer or tensor)."""
        if self._host is not None and not _is_device(dst):
            out = host_array(dst)
            pos = 0
            for off, n in runs:
                np.copyto(out[pos : pos + n], self._host[off : off + n])
                pos += n
            return
        out = as_tensor(dst)
        pos = 0
        for off, n in runs:
            out[pos : pos + n].copy_(self.buf[off : off + n], non_blocking=True)
            pos += n
        self._sync()

    def _sync(self) -> None:
        # Copies between pinned host memory and the device are asynchronous; the caller
        # may reuse its buffer (or we may reuse the pages) as soon as we return.
        if self.device.type == "cuda" or self.buf.is_pinned():
            torch.cuda.synchronize()

    def close(self) -> None:
        """Drop the pool's memory (the owner has dropped every view it handed out)."""
        self.buf = torch.empty(0, dtype=torch.uint8)
        self._host = None
        for view in (self._ro, self._rw):
            try:
                if view is not None:
                    view.release()
            except BufferError:  # a view is still out; it goes with its last holder
                pass
        if self.shared is not None:
            self.shared.close()

    def check_integrity(self, used_pages: list[int]) -> None:
        """Raise unless free and used pages partition the pool exactly once."""
        seen = self._free + used_pages
        if len(seen) != self.num_pages or len(set(seen)) != self.num_pages:
            raise AssertionError(
                f"pool of {self.num_pages} pages: {len(self._free)} free + {len(used_pages)} used, "
                f"{len(set(seen))} distinct"
            )
