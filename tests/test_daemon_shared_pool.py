"""The daemon's cpu pool in shared memory: same-host clients map it read-only and copy
hits out themselves (kvcore/shared_memory.py, store/wire/same_host.py)."""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from daemon_proc import chunk, same, start_daemon

from kvcore.shared_memory import PoolMapping, SharedBuffer
from store.client import IN_POOL, WINDOW_START, KVStoreClient
from store.wire import same_host
from store.wire.same_host import SameHost, redeem
from store.wire.stream import RemoteError, recv_frame, send_frame

MiB = 1 << 20
ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_clients_get_a_descriptor_that_cannot_write():
    shared = SharedBuffer(4 * 4096)
    try:
        shared.tensor[:5] = torch_bytes(b"hello")
        fd = shared.reader_fd()
        try:
            view = mmap.mmap(fd, shared.nbytes, prot=mmap.PROT_READ)
            assert view[:5] == b"hello"
            shared.tensor[5:6] = torch_bytes(b"!")  # the owner's writes show through
            assert view[:6] == b"hello!"
            view.close()
            with pytest.raises(PermissionError):
                mmap.mmap(fd, shared.nbytes)  # read-write shared mapping: refused
            with pytest.raises(OSError):
                os.write(fd, b"x")
            with pytest.raises(OSError):
                os.ftruncate(fd, 0)
            # Re-opened read-write through /proc (a memfd's mode is 0777): the write
            # seal still refuses every new writable mapping and every write.
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with pytest.raises(PermissionError):
                    mmap.mmap(rw, shared.nbytes)
                with pytest.raises(PermissionError):
                    os.pwrite(rw, b"x", 0)
            finally:
                os.close(rw)
            shared.tensor[6:7] = torch_bytes(b"?")  # the owner still writes
            assert mmap.mmap(fd, shared.nbytes, prot=mmap.PROT_READ)[:7] == b"hello!?"
        finally:
            os.close(fd)
    finally:
        shared.close()


def torch_bytes(b: bytes):
    import torch

    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def test_a_mapping_reads_only_runs_inside_the_pool_that_fill_the_buffer():
    shared = SharedBuffer(8192)
    shared.tensor.copy_(torch_bytes(bytes(range(256)) * 32))
    fd = shared.reader_fd()
    pool = PoolMapping(fd, 8192)
    os.close(fd)
    try:
        dst = np.zeros(300, np.uint8)
        assert pool.read([100, 200, 4096, 100], dst)  # two runs, in order
        want = np.frombuffer(bytes(range(256)) * 32, np.uint8)
        assert (dst[:200] == want[100:300]).all() and (dst[200:] == want[4096:4196]).all()
        for bad in ([8000, 300], [0, 299], [0, 150, 150], [-1, 300], [0.0, 300], [True, 300]):
            dst[:] = 7
            assert not pool.read(bad, dst), bad
            assert (dst == 7).all()  # nothing copied from a refused answer
        with pytest.raises(ValueError):
            PoolMapping(shared.reader_fd(), 4096)  # the size must be the pool's
    finally:
        pool.close()
        shared.close()


def test_a_ticket_is_good_once_names_its_redeemer_and_expires(monkeypatch):
    shared = SharedBuffer(4096)
    door = SameHost(shared)
    try:
        offer = door.offer()
        came_in, fd = redeem(offer, 2.0)
        assert came_in and fd is not None and os.fstat(fd).st_size == 4096
        os.close(fd)
        assert door.peer(offer["ticket"]) == (os.getpid(), os.getuid())  # from the kernel
        assert door.peer(offer["ticket"]) is None  # answered once
        assert redeem(offer, 2.0) == (False, None)  # used up
        assert redeem(dict(offer, ticket="0" * 32), 2.0) == (False, None)  # never issued
        monkeypatch.setattr(same_host, "TICKET_SECONDS", -1.0)
        assert redeem(door.offer(), 2.0) == (False, None)  # expired
        assert redeem({"socket": "kvstore-nothere", "ticket": "0" * 32}, 1.0) == (False, None)
    finally:
        door.close()
        shared.close()


def test_the_door_names_whoever_redeemed_the_ticket_even_without_a_pool():
    door = SameHost()  # no shared pool: pids only
    try:
        offer = door.offer()
        assert offer["size"] == 0
        code = (
            "import json, sys; from store.wire.same_host import redeem; "
            "print(redeem(json.loads(sys.argv[1]), 5.0))"
        )
        child = subprocess.run(
            [sys.executable, "-c", code, json.dumps(offer)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert child.stdout.strip() == "(True, None)"
        peer = door.peer(offer["ticket"])
        assert peer is not None and peer[0] not in (os.getpid(), 0)  # the child, not us
    finally:
        door.close()


@pytest.fixture(scope="module")
def small_daemon():
    """8 MiB of cpu pool: eight 1 MiB chunks fill it."""
    d = start_daemon("--cpu-size", "8MiB")
    yield d
    assert d.terminate() == 0


def test_shm_gets_read_the_shared_pool(small_daemon):
    chunks = [chunk(i, size=MiB, tag="pool") for i in range(4)]
    with KVStoreClient(small_daemon.url, transport="shm") as c:
        assert c.put(chunks) == [True] * 4
        outs = [np.empty(MiB, np.uint8) for _ in chunks]
        got = c.get([x.key for x in chunks], outs)
        assert all(same(g, x) for g, x in zip(got, chunks, strict=True))
        assert all(
            np.shares_memory(np.asarray(g.payload), o) for g, o in zip(got, outs, strict=True)
        )
        assert c._idle and c._idle[0].pool is not None
        assert c.delete([x.key for x in chunks]) == 4


def _lent_get(conn, keys):
    """Ask for ``keys`` through the pool and read the answer, without releasing."""
    send_frame(
        conn.sock,
        {
            "op": "get",
            "keys": keys,
            "region": True,
            "offset": WINDOW_START,
            "length": conn.region.size - WINDOW_START,
            "pool": True,
        },
    )
    rows = []
    while "part" in (meta := recv_frame(conn.sock)):
        rows += meta["part"]
    assert meta["done"] == len(keys) and meta["release"] is True
    assert [r[2] for r in rows] == [IN_POOL] * len(keys)
    return [r[3] for r in rows]


def test_lent_pages_stay_put_until_the_client_releases_them(small_daemon):
    first = [chunk(i, size=MiB, tag="lent") for i in range(4)]
    later = [chunk(i, size=MiB, tag="later") for i in range(8)]
    with (
        KVStoreClient(small_daemon.url, transport="shm") as reader,
        KVStoreClient(small_daemon.url, transport="stream") as writer,
    ):
        assert writer.put(first) == [True] * 4
        with reader._borrow("shm") as conn:
            runs = _lent_get(conn, [x.key for x in first])
            # Deleted and crowded out while lent: the pages must not be reused yet.
            assert writer.delete([x.key for x in first]) == 4
            writer.put(later)  # each evicts the one before it once the 4 free MiB are used
            held = writer.get([x.key for x in later])
            assert sum(g is not None for g in held) == 4  # the lent 4 MiB are not reused
            for r, x in zip(runs, first, strict=True):
                dst = np.empty(MiB, np.uint8)
                assert conn.pool.read(r, dst) and bytes(dst) == bytes(x.payload)
            send_frame(conn.sock, {"op": "release"})
            assert recv_frame(conn.sock)["released"]  # pinned until then: the copies hold
        writer.delete([x.key for x in later])
        assert writer.put(later) == [True] * 8  # released: the whole pool is usable again
        assert writer.lookup([x.key for x in later]) == ["cpu"] * 8
        writer.delete([x.key for x in later])


def test_a_release_frame_is_held_to_the_frame_limits(small_daemon):
    """The frame that ends a lent get is read within the same limits as any request:
    a "release" padded with a hundred thousand empty lists is refused, not built."""
    first = [chunk(i, size=MiB, tag="padded") for i in range(2)]
    with KVStoreClient(small_daemon.url, transport="shm") as reader:
        assert reader.put(first, transport="stream") == [True] * 2
        conn = reader._take("shm")
        try:
            _lent_get(conn, [x.key for x in first])
            send_frame(conn.sock, {"op": "release", "pad": [[]] * 100_000})
            with pytest.raises(RemoteError) as exc:
                while True:
                    meta = recv_frame(conn.sock)
                    if "error" in meta:
                        raise RemoteError(meta["error"], meta.get("message", ""))
                    assert not meta.get("released"), "the padded release was accepted"
            assert exc.value.code == "INVALID_ARGUMENT"
        finally:
            conn.close()
        got = reader.get([x.key for x in first])  # the pins went with the connection
        assert all(same(g, x) for g, x in zip(got, first, strict=True))
        reader.delete([x.key for x in first])


def test_a_client_that_goes_away_without_releasing_frees_its_pins(small_daemon):
    first = [chunk(i, size=MiB, tag="gone") for i in range(4)]
    later = [chunk(i, size=MiB, tag="after-gone") for i in range(8)]
    with KVStoreClient(small_daemon.url, transport="stream") as writer:
        assert writer.put(first) == [True] * 4
        for ending in ("close", "wrong op"):
            reader = KVStoreClient(small_daemon.url, transport="shm")
            conn = reader._take("shm")
            _lent_get(conn, [x.key for x in first])
            if ending == "wrong op":  # anything but release: the daemon drops the connection
                send_frame(conn.sock, {"op": "get", "keys": []})
                assert conn.sock.recv(1) == b""
            conn.close()
            reader.close()
        writer.delete([x.key for x in first])
        deadline_ok = False
        for _ in range(50):  # the daemon notices the closed socket promptly
            if writer.put(later) == [True] * 8:
                deadline_ok = True
                break
            writer.delete([x.key for x in later])
        assert deadline_ok
        writer.delete([x.key for x in later])


def test_hits_below_the_cpu_tier_still_come_through_the_region(tmp_path):
    d = start_daemon(
        "--cpu-size",
        "4MiB",
        "--disk-path",
        str(tmp_path),
        "--disk-size",
        "64MiB",
        "--set",
        "disk.fsync=false",
    )
    try:
        chunks = [chunk(i, size=MiB, tag="mixed") for i in range(10)]
        with KVStoreClient(d.url, transport="shm") as c:
            assert c.put(chunks) == [True] * 10  # written through to disk; the last 4 in cpu
            with c._borrow("shm") as conn:
                keys = [x.key for x in chunks[::-1]]  # cpu hits first: disk hits get promoted
                send_frame(
                    conn.sock,
                    {
                        "op": "get",
                        "keys": keys,
                        "region": True,
                        "offset": WINDOW_START,
                        "length": conn.region.size - WINDOW_START,
                        "pool": True,
                    },
                )
                offsets = []
                while "part" in (meta := recv_frame(conn.sock)):
                    offsets += [r[2] for r in meta["part"]]
                assert meta["release"] and len(offsets) == 10
                send_frame(conn.sock, {"op": "release"})
                assert recv_frame(conn.sock)["released"]
            assert 0 < offsets.count(IN_POOL) < 10  # both paths in one get
            got = c.get([x.key for x in chunks])
            assert all(same(g, x) for g, x in zip(got, chunks, strict=True))
    finally:
        assert d.terminate() == 0


def test_a_private_pool_serves_shm_gets_through_the_region():
    d = start_daemon("--cpu-size", "8MiB", "--set", "cpu.shared=false")
    try:
        chunks = [chunk(i, size=100_000, tag="private") for i in range(5)]
        with KVStoreClient(d.url, transport="shm") as c:
            assert c.put(chunks) == [True] * 5
            got = c.get([x.key for x in chunks])
            assert all(same(g, x) for g, x in zip(got, chunks, strict=True))
            assert c._idle[0].region is not None and c._idle[0].pool is None
    finally:
        assert d.terminate() == 0


def test_shm_is_tried_even_after_stream_connections_were_pooled(small_daemon):
    chunks = [chunk(i, size=100_000, tag="order") for i in range(3)]
    with KVStoreClient(small_daemon.url) as c:
        assert c.put(chunks, transport="stream") == [True] * 3  # pools a plain connection
        got = c.get([x.key for x in chunks], transport="shm")
        assert all(same(g, x) for g, x in zip(got, chunks, strict=True))
        assert any(conn.pool is not None for conn in c._idle)  # not the stream one again
        c.delete([x.key for x in chunks])


def _maps_pool() -> bool:
    with open("/proc/self/maps") as f:
        return "kvstore-pool" in f.read()


def test_a_dead_daemons_pool_is_unmapped_by_its_clients():
    d = start_daemon("--cpu-size", "8MiB")
    x = chunk(1, size=100_000, tag="dead")
    c = KVStoreClient(d.url, transport="shm", timeout=2.0, connect_timeout=1.0)
    try:
        assert c.put([x]) == [True] and same(c.get([x.key])[0], x)
        assert _maps_pool()  # the memfd of the daemon's pool, mapped read-only here
        d.kill()
        with pytest.raises((OSError, RemoteError)):  # the socket dies, then gRPC refuses
            c.get([x.key])
        assert c._pools == {} and not _maps_pool()  # its memory can go with the daemon
    finally:
        c.close()
        d.kill()


def test_a_client_too_slow_to_release_gets_an_error_not_the_bytes(monkeypatch):
    from store.config import from_flat
    from store.daemon.serve import Daemon, ServeOptions

    d = Daemon(
        from_flat({"tiers": ["cpu"], "cpu.size": "8MiB", "cpu.shared": True}),
        ServeOptions(port=0, metrics_port=None),
    )
    d.streams.release_timeout = 0.3
    try:
        x = chunk(1, size=MiB, tag="slow")
        with KVStoreClient(f"kvstore://127.0.0.1:{d.port}", transport="shm") as c:
            assert c.put([x]) == [True]
            read = PoolMapping.read

            def stalled(self, runs, dst):  # the client stalls mid-copy past the timeout
                time.sleep(1.0)
                return read(self, runs, dst)

            monkeypatch.setattr(PoolMapping, "read", stalled)
            with pytest.raises(OSError):  # the pins were gone: what it copied may be stale
                c.get([x.key])
            monkeypatch.setattr(PoolMapping, "read", read)
            assert same(c.get([x.key])[0], x)  # a fresh connection reads it fine
    finally:
        d.stop()


def test_a_silent_visitor_does_not_hold_the_door_for_others():
    door = SameHost()
    squatters = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for s in squatters:  # connect and say nothing
            s.connect("\0" + door.name)
        start = time.monotonic()
        offer = door.offer()
        assert redeem(offer, 1.0) == (True, None)
        assert time.monotonic() - start < 1.0  # served at once, not after the squatters
    finally:
        for s in squatters:
            s.close()
        door.close()
    with pytest.raises(OSError):  # closed: the name is free again, nothing answers
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect("\0" + door.name)


def test_one_get_lends_at_most_a_quarter_of_the_pool(small_daemon):
    chunks = [chunk(i, size=MiB, tag="cap") for i in range(6)]  # 6 of the pool's 8 MiB
    with KVStoreClient(small_daemon.url, transport="shm") as c:
        assert c.put(chunks) == [True] * 6
        with c._borrow("shm") as conn:
            send_frame(
                conn.sock,
                {
                    "op": "get",
                    "keys": [x.key for x in chunks],
                    "region": True,
                    "offset": WINDOW_START,
                    "pool": True,
                    "length": conn.region.size - WINDOW_START,
                },
            )
            offsets = []
            while "part" in (meta := recv_frame(conn.sock)):
                offsets += [r[2] for r in meta["part"]]
            send_frame(conn.sock, {"op": "release"})
            assert recv_frame(conn.sock)["released"]
        # Lending stops in the part after 2 MiB (a quarter) were lent; the rest is copied.
        assert offsets[:4] == [IN_POOL] * 4 and all(o >= 0 for o in offsets[4:])
        got = c.get([x.key for x in chunks])
        assert all(same(g, x) for g, x in zip(got, chunks, strict=True))
        c.delete([x.key for x in chunks])
