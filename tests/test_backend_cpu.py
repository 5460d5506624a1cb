"""The cpu tier's paged pool: no fragmentation under churn, slab-like runs, pins."""

from __future__ import annotations

import random
import threading

import numpy as np

from backends.cpu import CPUBackend
from backends.pool import pages_to_runs
from kvcore.chunk import make_chunk

FP = b"\x02" * 32


def chunk(i: int, size: int):
    data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
    return make_chunk(f"{i:064d}", FP, data, 1, dtype="uint8")


def test_pages_to_runs_coalesces_consecutive_pages():
    assert pages_to_runs([0, 1, 2], 100, 250) == [(0, 250)]
    assert pages_to_runs([4, 5, 9], 100, 300) == [(400, 200), (900, 100)]
    assert pages_to_runs([3], 100, 0) == []


def test_uniform_chunks_stay_one_contiguous_run_under_churn():
    b = CPUBackend(capacity=16 * 1024, page_size=1024, policy="lru")
    for i in range(200):
        b.put([chunk(i, 3 * 1024)])  # 5 fit; every put evicts once the pool is full
        if i % 7 == 0:
            b.delete([f"{i - 2:064d}"])
    assert all(len(e.runs) == 1 for e in b._entries.values())
    b.check_integrity()


def test_mixed_sizes_never_fragment_the_pool():
    rng = random.Random(3)
    b = CPUBackend(capacity=64 * 1024, page_size=1024, policy="s3fifo")
    live: dict[int, int] = {}
    for i in range(1500):
        size = rng.choice([100, 1024, 2500, 7000, 16000])
        free = b.pool.free_pages
        evictions = b.evictions
        assert b.put([chunk(i, size)]) == [True]
        if b.pool.pages_for(size) <= free:  # room in total means room: no eviction needed
            assert b.evictions == evictions
        live[i] = size
        if rng.random() < 0.3:
            victim = rng.choice(list(live))
            b.delete([f"{victim:064d}"])
            live.pop(victim)
    b.check_integrity()
    keys = [k for k in b._entries]
    got = b.get(keys)
    for k, g in zip(keys, got, strict=True):
        assert bytes(np.asarray(g.payload)) == bytes(chunk(int(k), g.header.nbytes).payload)


def test_a_chunk_being_read_is_not_evicted_and_delete_waits_for_the_reader():
    b = CPUBackend(capacity=4 * 1024, page_size=1024, policy="lru")
    b.put([chunk(0, 1024)])
    b.pin([f"{0:064d}"])  # as a reader does for the length of its copy
    for i in range(1, 10):
        b.put([chunk(i, 1024)])
    assert b.contains([f"{0:064d}"]) == 1
    assert b.delete([f"{0:064d}"]) == 1
    assert b.pool.free_pages == 0  # pages of the deleted chunk wait for the unpin
    b.unpin([f"{0:064d}"])
    assert b.pool.free_pages == 1
    b.check_integrity()


def test_concurrent_readers_and_writers_never_see_wrong_bytes():
    b = CPUBackend(capacity=32 * 1024, page_size=1024, policy="s3fifo")
    errors: list[str] = []

    def writer(seed: int) -> None:
        for i in range(300):
            b.put([chunk((seed * 1000 + i) % 60, 3000)])

    def reader() -> None:
        for i in range(600):
            key = f"{i % 60:064d}"
            (got,) = b.get([key])
            if got is not None and bytes(np.asarray(got.payload)) != bytes(
                chunk(i % 60, 3000).payload
            ):
                errors.append(key)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(2)] + [
        threading.Thread(target=reader) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    b.check_integrity()


def test_a_chunk_larger_than_the_pool_is_refused():
    b = CPUBackend(capacity=4 * 1024, page_size=1024)
    b.put([chunk(1, 1024)])
    assert b.put([chunk(2, 5 * 1024)]) == [False]
    assert b.contains([f"{1:064d}"]) == 1


def test_borrowed_pages_are_read_only_pinned_views_until_unpinned():
    b = CPUBackend(capacity=8 * 4096, page_size=4096, policy="lru")
    cs = [chunk(i, 2 * 4096) for i in range(3)]  # two pages each; the pool holds four chunks
    b.put(cs)
    lent = b.borrow([cs[0].key, "missing", cs[2].key])
    assert lent[1] is None
    for (header, views), c in zip([lent[0], lent[2]], [cs[0], cs[2]], strict=True):
        assert header == c.header and b"".join(bytes(v) for v in views) == bytes(c.payload)
        assert all(v.readonly for v in views)
    b.put([chunk(10, 2 * 4096), chunk(11, 2 * 4096)])  # full: evicts, but not the lent ones
    assert b.contains([cs[0].key]) == 1 and b.contains([cs[2].key]) == 1
    b.delete([cs[0].key])  # deleted while lent: its pages wait for the unpin
    assert b"".join(bytes(v) for v in lent[0][1]) == bytes(cs[0].payload)
    b.unpin([cs[0].key, cs[2].key])
    b.check_integrity()
    assert b.borrow([cs[0].key]) == [None]


def test_reserved_pages_are_invisible_until_committed_and_freed_if_refused():
    b = CPUBackend(capacity=8 * 4096, page_size=4096, policy="lru")
    old = chunk(0, 4096)
    b.put([old])
    new = [chunk(1, 2 * 4096), chunk(2, 4096)]
    places = b.reserve([old.header, *(c.header for c in new)])
    assert places[0] is None  # stored already: nothing to reserve
    for views, c in zip(places[1:], new, strict=True):
        data = np.frombuffer(bytes(c.payload), np.uint8)
        pos = 0
        for v in views:
            v[:] = data[pos : pos + v.nbytes]
            pos += v.nbytes
    assert b.contains([new[0].key]) == 0 and b.get([new[0].key]) == [None]
    assert b.reserve([new[0].header]) == [None]  # being written
    b.check_integrity()
    assert b.commit([c.header for c in new], [True, False]) == [True, False]
    assert bytes(b.get([new[0].key])[0].payload) == bytes(new[0].payload)
    assert b.contains([new[1].key]) == 0 and b.usage().bytes_used == 3 * 4096
    b.check_integrity()
