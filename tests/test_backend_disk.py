"""The disk tier: restart keeps hits, atomic files, budget, damaged files, disk full."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import backends.diskio as diskio
from backends.base import Corrupt
from backends.disk import DiskBackend
from kvcore.chunk import CheckedChunk, ChunkError, make_chunk, verify

FP = b"\x03" * 32


def chunk(i: int, size: int = 5000):
    data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
    return make_chunk(f"{i:064d}", FP, data, 1, dtype="uint8")


def same(got, want) -> bool:
    return got.header == want.header and bytes(np.asarray(got.payload)) == bytes(want.payload)


def test_a_restarted_process_keeps_its_disk_hits(tmp_path):
    b = DiskBackend(str(tmp_path), capacity=1 << 20)
    cs = [chunk(i) for i in range(4)]
    b.put(cs)
    b.close()
    again = DiskBackend(str(tmp_path), capacity=1 << 20)
    assert again.contains([c.key for c in cs]) == 4 and again.dropped_on_start == 0
    assert all(same(g, c) for g, c in zip(again.get([c.key for c in cs]), cs, strict=True))
    again.check_integrity()


def test_start_drops_truncated_files_and_stray_temp_files(tmp_path):
    b = DiskBackend(str(tmp_path), capacity=1 << 20)
    cs = [chunk(i) for i in range(3)]
    b.put(cs)
    with open(b.path_of(cs[1].key), "r+b") as f:
        f.truncate(4096 + 100)
    stray = os.path.join(os.path.dirname(b.path_of(cs[0].key)), f".{cs[0].key}.dead.tmp")
    open(stray, "wb").write(b"half a chunk")
    again = DiskBackend(str(tmp_path), capacity=1 << 20)
    assert again.dropped_on_start == 2
    assert again.contains([cs[0].key]) == 1 and again.contains([cs[1].key]) == 0
    assert not os.path.exists(stray) and not os.path.exists(b.path_of(cs[1].key))
    assert same(again.get([cs[2].key])[0], cs[2])


def test_a_file_truncated_while_running_is_reported_and_dropped(tmp_path):
    b = DiskBackend(str(tmp_path), capacity=1 << 20)
    cs = [chunk(i) for i in range(2)]
    b.put(cs)
    os.truncate(b.path_of(cs[0].key), 4096 + 10)
    got = b.get([c.key for c in cs])
    assert isinstance(got[0], Corrupt) and "truncated" in got[0].reason
    assert same(got[1], cs[1])
    assert b.contains([cs[0].key]) == 0 and not os.path.exists(b.path_of(cs[0].key))
    b.check_integrity()


def test_byte_budget_evicts_lru_first(tmp_path):
    size = 4096 + 5000
    b = DiskBackend(str(tmp_path), capacity=3 * size, policy="lru")
    cs = [chunk(i) for i in range(5)]
    for c in cs[:3]:
        b.put([c])
    b.get([cs[0].key])  # recently used: survives
    b.put(cs[3:])
    assert b.usage().bytes_used <= 3 * size
    assert [b.contains([c.key]) for c in cs] == [1, 0, 0, 1, 1]
    assert b.evictions == 2
    b.check_integrity()


def test_disk_full_fails_the_put_and_loses_nothing_else(tmp_path, monkeypatch):
    b = DiskBackend(str(tmp_path), capacity=1 << 20)
    kept = chunk(1)
    b.put([kept])

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskio, "_writev_all", full)
    assert b.put([chunk(2)]) == [False]
    monkeypatch.undo()
    assert b.contains([chunk(2).key]) == 0
    assert same(b.get([kept.key])[0], kept)
    leftovers = [n for _, _, names in os.walk(tmp_path) for n in names if n.endswith(".tmp")]
    assert leftovers == []
    b.check_integrity()
    assert b.put([chunk(2)]) == [True]  # space back: works again


def test_concurrent_writers_of_one_key_leave_one_intact_file(tmp_path):
    backends = [DiskBackend(str(tmp_path), capacity=1 << 22) for _ in range(4)]  # 4 "processes"
    c = chunk(7, size=300_000)
    barrier = threading.Barrier(4)

    def write(b: DiskBackend) -> None:
        barrier.wait()
        for _ in range(5):
            assert b.put([c]) == [True]
            b.delete([c.key])
            assert b.put([c]) == [True]

    threads = [threading.Thread(target=write, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = DiskBackend(str(tmp_path), capacity=1 << 22)
    got = fresh.get([c.key])[0]
    assert got is None or same(got, c)  # the last delete may win; never half a chunk
    for name in os.listdir(os.path.dirname(fresh.path_of(c.key))):
        assert not name.endswith(".tmp")


@pytest.mark.parametrize("o_direct", [False, True])
def test_o_direct_round_trip_or_clean_fallback(tmp_path, o_direct):
    b = DiskBackend(str(tmp_path), capacity=1 << 22, o_direct=o_direct)
    cs = [chunk(i, size=s) for i, s in enumerate([1, 4096, 70_000])]
    assert b.put(cs) == [True] * 3
    outs = [np.zeros(c.header.nbytes, np.uint8) for c in cs]
    got = b.get([c.key for c in cs], outs)
    assert all(same(g, c) for g, c in zip(got, cs, strict=True))
    assert all(os.path.getsize(b.path_of(c.key)) == 4096 + c.header.nbytes for c in cs)


def test_a_flipped_byte_read_into_a_buffer_is_corrupt_and_dropped(tmp_path):
    b = DiskBackend(str(tmp_path), capacity=1 << 20)
    cs = [chunk(i) for i in range(2)]
    b.put(cs)
    with open(b.path_of(cs[0].key), "r+b") as f:
        f.seek(4096 + 17)
        byte = f.read(1)
        f.seek(4096 + 17)
        f.write(bytes([byte[0] ^ 0x10]))
    got = b.get([c.key for c in cs], [np.empty(5000, np.uint8) for _ in cs])
    assert isinstance(got[0], Corrupt) and "checksum" in got[0].reason
    assert isinstance(got[1], CheckedChunk) and same(got[1], cs[1])
    assert b.contains([cs[0].key]) == 0 and not os.path.exists(b.path_of(cs[0].key))
    b.check_integrity()


def test_a_checked_chunk_is_still_refused_for_another_key_or_model(tmp_path):
    b = DiskBackend(str(tmp_path), capacity=1 << 20)
    c = chunk(1)
    b.put([c])
    (got,) = b.get([c.key], [np.empty(5000, np.uint8)])
    assert isinstance(got, CheckedChunk)
    verify(got, c.key, FP)
    with pytest.raises(ChunkError, match="holds"):
        verify(got, chunk(2).key, FP)
    with pytest.raises(ChunkError, match="fingerprint"):
        verify(got, c.key, b"\x04" * 32)


def test_reads_into_tensors_and_shaped_arrays(tmp_path):
    torch = pytest.importorskip("torch")
    b = DiskBackend(str(tmp_path), capacity=1 << 20)
    c = chunk(1, size=4096)
    b.put([c])
    shaped = np.zeros((2, 2048), np.uint8)
    tensor = torch.zeros(1024, dtype=torch.float32)
    got = b.get([c.key, c.key], [shaped, tensor])
    assert bytes(shaped.reshape(-1)) == bytes(c.payload)
    assert bytes(tensor.numpy().view(np.uint8)) == bytes(c.payload)
    assert all(same(g, c) for g in got)
