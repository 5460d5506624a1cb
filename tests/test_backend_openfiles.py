"""Read descriptors the disk tier keeps open between gets: bounded, closed when their file
is dropped, never closed under a reader, and never a way to serve wrong bytes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from backends.base import Corrupt
from backends.disk import DiskBackend
from backends.openfiles import OpenFiles
from kvcore.chunk import CheckedChunk, make_chunk

FP = b"\x05" * 32


def chunk(i: int, size: int = 8192):
    data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
    return make_chunk(f"{i:064d}", FP, data, 1, dtype="uint8")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def read(b: DiskBackend, cs):
    outs = [np.empty(c.header.nbytes, np.uint8) for c in cs]
    return b.get([c.key for c in cs], outs), outs


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_repeated_gets_reuse_descriptors_and_the_lru_bounds_them(tmp_path):
    b = DiskBackend(str(tmp_path), capacity=1 << 22, open_files=3)
    cs = [chunk(i) for i in range(5)]
    b.put(cs)
    before = open_fds()
    got, outs = read(b, cs[:2])
    assert all(isinstance(g, CheckedChunk) for g in got)
    assert open_fds() == before + 2 == before + len(b._open)
    read(b, cs[:2])  # the same files again: no new descriptor
    assert open_fds() == before + 2
    got, outs = read(b, cs)  # five files through a cache of three
    assert [bytes(o) for o in outs] == [bytes(c.payload) for c in cs]
    assert len(b._open) == 3 and open_fds() == before + 3
    b.close()
    assert open_fds() == before


def test_a_deleted_or_evicted_chunk_closes_its_descriptor(tmp_path):
    size = chunk(0).header.nbytes + 4096
    b = DiskBackend(str(tmp_path), capacity=3 * size, policy="lru", open_files=8)
    cs = [chunk(i) for i in range(4)]
    b.put(cs[:3])
    read(b, cs[:3])
    assert len(b._open) == 3
    b.put([cs[3]])  # a full budget: evicts the least recently used, cs[0]
    assert len(b._open) == 2 and b.contains([cs[0].key]) == 0
    b.delete([cs[1].key])
    assert len(b._open) == 1
    assert b.get([cs[0].key]) == [None]


def test_a_file_truncated_under_an_open_descriptor_is_corrupt_and_closed(tmp_path):
    b = DiskBackend(str(tmp_path), capacity=1 << 22)
    cs = [chunk(i) for i in range(2)]
    b.put(cs)
    read(b, cs)
    os.truncate(b.path_of(cs[0].key), 4096 + 10)
    got, outs = read(b, cs)
    assert isinstance(got[0], Corrupt) and isinstance(got[1], CheckedChunk)
    assert bytes(outs[1]) == bytes(cs[1].payload)
    assert len(b._open) == 1 and b.contains([cs[0].key]) == 0
    assert not os.path.exists(b.path_of(cs[0].key))


def test_bytes_flipped_under_an_open_descriptor_are_corrupt(tmp_path):
    b = DiskBackend(str(tmp_path), capacity=1 << 22)
    c = chunk(7)
    b.put([c])
    read(b, [c])
    with open(b.path_of(c.key), "r+b") as f:
        f.seek(4096 + 100)
        f.write(bytes([c.payload[100] ^ 0xFF]))
    got, _ = read(b, [c])
    assert isinstance(got[0], Corrupt) and len(b._open) == 0


def test_a_file_replaced_by_another_writer_still_reads_its_own_key(tmp_path):
    """Another process rewrites the key (same content, new inode): either copy is the
    chunk, and the descriptor still reads the complete one it was opened on."""
    b = DiskBackend(str(tmp_path), capacity=1 << 22)
    c = chunk(3)
    b.put([c])
    read(b, [c])
    other = DiskBackend(str(tmp_path / "other"), capacity=1 << 22)
    other.put([c])
    os.replace(other.path_of(c.key), b.path_of(c.key))
    got, outs = read(b, [c])
    assert isinstance(got[0], CheckedChunk) and bytes(outs[0]) == bytes(c.payload)


def test_a_held_descriptor_is_closed_by_its_last_reader_not_before(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    files = OpenFiles(4)
    fd = os.open(path, os.O_RDONLY)
    files.release([], [("k", fd)])
    held = files.borrow(["k", "missing"])
    assert held == [fd, None]
    again = files.borrow(["k"])
    files.forget("k")  # dropped while two readers hold it
    assert is_open(fd) and len(files) == 0
    files.release(held, [])
    assert is_open(fd)
    files.release(again, [])
    assert not is_open(fd)


def test_a_second_copy_of_a_key_is_closed_and_no_limit_keeps_nothing(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    files = OpenFiles(4)
    a, b = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    files.release([], [("k", a), ("k", b)])
    assert files.borrow(["k"]) == [a] and not is_open(b)
    none = OpenFiles(0)
    c = os.open(path, os.O_RDONLY)
    none.release([], [("k", c)])
    assert len(none) == 0 and not is_open(c)


@pytest.mark.parametrize("bad", [-1, "many"])
def test_open_files_must_be_a_whole_number(bad):
    from store.config import ConfigError, from_flat

    with pytest.raises(ConfigError, match="open_files"):
        from_flat({"tiers": ["disk"], "disk.open_files": bad})
