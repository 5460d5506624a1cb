"""CPU RAM tier: a preallocated, paged pool (pinned when CUDA is present) with eviction.

Chunks are private to this process, so the tier keeps headers as Python objects and only
payload bytes in the pool. Locking: the index and allocator change under one lock, but
payload copies run outside it. A reader pins the chunk for the length of its copy, and a
writer publishes its entry only after its copy is done, so no one ever sees half a
chunk, and eviction (which skips pinned keys) never frees pages under a reader.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from backends.base import Backend, GetResult, Usage
from backends.pins import PinCounts
from backends.policy import POLICIES
from backends.pool import PagedPool, Run, pages_to_runs
from kvcore.buffers import flat_bytes
from kvcore.chunk import Chunk, ChunkHeader

log = logging.getLogger(__name__)


class _Entry(NamedTuple):
    header: ChunkHeader
    pages: list[int]
    runs: list[Run]


class CPUBackend(Backend):
    """Host-memory tier of ``capacity`` bytes in pages of ``page_size`` bytes."""

    name = "cpu"
    bounded = True
    device = "cpu"

    def __init__(
        self,
        capacity: int,
        page_size: int = 64 * 1024,
        policy: str = "s3fifo",
        pin_memory: bool | None = None,
        shared: bool = False,
    ) -> None:
        if pin_memory is None:  # a shared pool is a daemon's: it feeds sockets, not a GPU
            pin_memory = self.device == "cpu" and torch.cuda.is_available() and not shared
        self.pool = PagedPool(
            capacity, page_size, device=self.device, pin=pin_memory, shared=shared
        )
        self.policy = POLICIES[policy](self.pool.num_pages)
        self._entries: dict[str, _Entry] = {}
        self._writing: set[str] = set()  # keys whose payload is being copied in
        self._pins = PinCounts()
        self._deferred: dict[str, list[list[int]]] = {}  # pages of deleted-while-pinned keys
        self._reserved: dict[str, tuple[list[int], list[Run]]] = {}  # handed out by ``reserve``
        self._lock = threading.Lock()
        self.on_evict = None
        self.evictions = 0
        self._closed = False

    # -- put ------------------------------------------------------------------------
    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        # Groups of at most half the pool: a group's pages are taken before its copies
        # run, so a batch larger than the pool still stores its tail by evicting its head.
        results: list[bool] = []
        group: list[Chunk] = []
        pages = 0
        for chunk in chunks:
            need = self.pool.pages_for(chunk.header.nbytes)
            if group and pages + need > self.pool.num_pages // 2:
                results += self._put_group(group)
                group, pages = [], 0
            group.append(chunk)
            pages += need
        return results + (self._put_group(group) if group else [])

    def _put_group(self, chunks: list[Chunk]) -> list[bool]:
        """Reserve pages for every chunk under one lock, copy unlocked, then publish."""
        results = [False] * len(chunks)
        todo: list[tuple[int, list[int]]] = []
        with self._lock:
            for i, chunk in enumerate(chunks):
                key = chunk.header.key
                if self._closed:
                    break
                if key in self._entries or key in self._writing:
                    results[i] = True  # same key, same content: one copy is enough
                    continue
                pages = self._alloc(chunk.header.nbytes)
                if pages is not None:
                    self._writing.add(key)
                    todo.append((i, pages))
        done = 0
        try:
            for i, pages in todo:
                runs = pages_to_runs(pages, self.pool.page_size, chunks[i].header.nbytes)
                self.pool.write(runs, chunks[i].payload)
                done += 1
        finally:
            with self._lock:
                for n, (i, pages) in enumerate(todo):
                    header = chunks[i].header
                    self._writing.discard(header.key)
                    if n >= done:  # the copy failed or never ran
                        self.pool.release(pages)
                        continue
                    runs = pages_to_runs(pages, self.pool.page_size, header.nbytes)
                    self._entries[header.key] = _Entry(header, pages, runs)
                    self.policy.insert(header.key, len(pages))
                    results[i] = True
        return results

    def _alloc(self, nbytes: int) -> list[int] | None:
        """Pages for ``nbytes``, evicting unpinned chunks as needed (lock held)."""
        if self.pool.pages_for(nbytes) > self.pool.num_pages:
            return None
        while (pages := self.pool.alloc(nbytes)) is None:
            victim = self.policy.victim(self._is_pinned)
            if victim is None:
                log.debug("%s tier full of pinned chunks; not storing", self.name)
                return None
            self._evict(victim)
        return pages

    def _evict(self, key: str) -> None:
        entry = self._entries.pop(key)
        if self.on_evict is not None:
            # Hand the lower tier its own copy: these pages are reused right after.
            payload = np.empty(entry.header.nbytes, dtype=np.uint8)
            self.pool.read(entry.runs, payload)
            try:
                self.on_evict(Chunk(entry.header, memoryview(payload)))
            except Exception:  # demotion is best effort; the chunk is just gone then
                log.warning("demoting chunk %s from %s failed", key[:12], self.name, exc_info=True)
        self.pool.release(entry.pages)
        self.evictions += 1

    def _is_pinned(self, key: str) -> bool:
        return key in self._pins

    # -- get ------------------------------------------------------------------------
    def get(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> list[GetResult]:
        """Pin every hit under one lock, copy unlocked, unpin under one lock."""
        with self._lock:
            entries = [None if self._closed else self._entries.get(k) for k in keys]
            hits = [k for k, e in zip(keys, entries, strict=True) if e is not None]
            self._pins.pin(hits)
            for key in hits:
                self.policy.touch(key)
        results: list[GetResult] = [None] * len(keys)
        try:
            for i, entry in enumerate(entries):
                if entry is None:
                    continue
                out = outs[i] if outs is not None else None
                out = self._new_buffer(entry.header.nbytes) if out is None else flat_bytes(out)
                out = out[: entry.header.nbytes]
                self.pool.read(entry.runs, out)
                results[i] = Chunk(entry.header, out)
        finally:
            self.unpin(hits)
        return results

    def lend(self, keys: Sequence[str]) -> list[tuple[ChunkHeader, list[Run]] | None]:
        """Each hit's header and the runs of the pool holding its payload, pinned until
        the caller's ``unpin`` of the hit keys: the pages stay as they are (not evicted,
        not reused) while someone reads them. Host pools only."""
        host = self.pool.on_host
        with self._lock:
            entries = [None if self._closed or not host else self._entries.get(k) for k in keys]
            hits = [k for k, e in zip(keys, entries, strict=True) if e is not None]
            self._pins.pin(hits)
            for key in hits:
                self.policy.touch(key)
        return [None if e is None else (e.header, e.runs) for e in entries]

    def borrow(self, keys: Sequence[str]) -> list[tuple[ChunkHeader, list[np.ndarray]] | None]:
        """``lend``, with each payload as read-only views of the pool's pages (one per
        run): a daemon sends them straight to a socket instead of copying them out."""
        return [
            None if x is None else (x[0], self.pool.views(x[1], writable=False))  # type: ignore[misc]
            for x in self.lend(keys)
        ]

    @property
    def shared(self) -> Any:
        """The pool's SharedBuffer when it lives in shared memory (clients on this host
        map it read-only and copy lent chunks out themselves), else None."""
        return self.pool.shared

    def reserve(self, headers: Sequence[ChunkHeader]) -> list[list[np.ndarray] | None]:
        """Writable views of freshly allocated pages for each chunk (one per run), for the
        caller to fill (a daemon receives payloads straight into them) and then
        ``commit``: nothing is visible before that. None where the key is stored or being
        written already, or no room could be made. Host pools only."""
        host = self.pool.on_host
        out: list[list[np.ndarray] | None] = []
        with self._lock:
            for h in headers:
                key = h.key
                if self._closed or not host or key in self._entries or key in self._writing:
                    out.append(None)
                    continue
                pages = self._alloc(h.nbytes)
                if pages is None:
                    out.append(None)
                    continue
                self._writing.add(key)
                runs = pages_to_runs(pages, self.pool.page_size, h.nbytes)
                self._reserved[key] = (pages, runs)
                out.append(self.pool.views(runs, True))
        return out

    def commit(self, headers: Sequence[ChunkHeader], ok: Sequence[bool]) -> list[bool]:
        """Publish the reserved chunks whose ``ok`` is true, free the others' pages; per
        chunk, whether it is now stored here."""
        stored = []
        with self._lock:
            for h, good in zip(headers, ok, strict=True):
                held = self._reserved.pop(h.key, None)
                if held is None:
                    stored.append(False)
                    continue
                pages, runs = held
                self._writing.discard(h.key)
                if good and not self._closed:
                    self._entries[h.key] = _Entry(h, pages, runs)
                    self.policy.insert(h.key, len(pages))
                    stored.append(True)
                else:
                    if not self._closed:
                        self.pool.release(pages)
                    stored.append(False)
        return stored

    def _new_buffer(self, nbytes: int) -> Any:
        return memoryview(np.empty(nbytes, dtype=np.uint8))

    # -- the rest -------------------------------------------------------------------
    def contains(self, keys: Sequence[str]) -> int:
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._entries:
                    return i
        return len(keys)

    def delete(self, keys: Sequence[str]) -> int:
        n = 0
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is None:
                    continue
                n += 1
                self.policy.remove(key)
                if key in self._pins:  # a reader is copying from these pages
                    self._deferred.setdefault(key, []).append(entry.pages)
                else:
                    self.pool.release(entry.pages)
        return n

    def pin(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._pins.pin(keys)

    def unpin(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in self._pins.unpin(keys):
                for pages in self._deferred.pop(key, []):
                    self.pool.release(pages)

    def usage(self) -> Usage:
        with self._lock:
            used = self.pool.num_pages - self.pool.free_pages
            return Usage(len(self._entries), used * self.pool.page_size, self.pool.capacity)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._pins.clear()
            self._deferred.clear()
            self._reserved.clear()
            self.policy = POLICIES["lru"](0)
            self.pool.close()  # drop the big allocation

    def check_integrity(self) -> None:
        """Raise unless index, policy and allocator agree (no page owned twice or lost)."""
        with self._lock:
            used = [p for e in self._entries.values() for p in e.pages]
            used += [p for lists in self._deferred.values() for pages in lists for p in pages]
            used += [p for pages, _ in self._reserved.values() for p in pages]
            self.pool.check_integrity(used)
            if len(self.policy) != len(self._entries):
                raise AssertionError(
                    f"policy tracks {len(self.policy)} keys, index has {len(self._entries)}"
                )
