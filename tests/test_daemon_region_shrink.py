"""A same-host client that shrinks its shared-memory region after ``attach`` (issue 13,
item 2) must not take the daemon down: before the fix, the daemon's next copy into or
out of its mapping of the region touched pages past the file's new end and died of
SIGBUS, with nothing logged. The daemon never maps a client's region now; it reads and
writes it with ``preadv``/``pwritev``, which see a short file instead of a fault."""

from __future__ import annotations

import mmap
import os
import secrets

import numpy as np
import pytest
from daemon_proc import chunk, same, start_daemon

from store.client import WINDOW_START, KVStoreClient
from store.wire.put_frame import put_groups
from store.wire.shm import NONCE_BYTES, SHM_DIR
from store.wire.stream import RemoteError, check_reply, recv_frame, send_frame

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture(scope="module")
def daemon():
    # A private (not shared) pool: gets are copied into the client's region.
    d = start_daemon("--cpu-size", "16MiB", "--set", "cpu.shared=false")
    yield d
    assert d.terminate() == 0


def _attach_own_region(conn):
    """Attach a region whose file descriptor this test keeps (a real client closes it)."""
    name = f"kvstore-{secrets.token_hex(16)}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, SIZE)
    nonce = secrets.token_bytes(NONCE_BYTES)
    os.pwrite(fd, nonce, 0)
    send_frame(conn.sock, {"op": "attach", "name": name, "nonce": nonce})
    try:
        reply = check_reply(recv_frame(conn.sock))
    finally:
        os.unlink(path)
    assert reply["size"] == SIZE
    return fd


def _still_serves(d, tag):
    good = [chunk(i, size=100_000, tag=tag) for i in range(3)]
    for transport in ("stream", "shm"):
        with KVStoreClient(d.url, timeout=10, transport=transport) as c:
            assert c.put(good) == [True] * 3
            got = c.get([x.key for x in good])
            assert all(same(g, x) for g, x in zip(got, good, strict=True))
            c.delete([x.key for x in good])
    assert d.proc.poll() is None


@pytest.mark.parametrize("shrink_to", [0, NONCE_BYTES, WINDOW_START + 4096])
def test_a_region_shrunk_after_attach_fails_its_get_not_the_daemon(daemon, shrink_to):
    stored = [chunk(i, size=200_000, tag=f"shrink-get-{shrink_to}") for i in range(6)]
    with KVStoreClient(daemon.url, timeout=10, transport="stream") as c:
        assert c.put(stored) == [True] * 6
        conn = c._take("stream")
    try:
        fd = _attach_own_region(conn)
        os.ftruncate(fd, shrink_to)
        send_frame(
            conn.sock,
            {
                "op": "get",
                "keys": [x.key for x in stored],
                "region": True,
                "offset": WINDOW_START,
                "length": SIZE - WINDOW_START,
            },
        )
        with pytest.raises(RemoteError, match="region") as exc:
            while "part" in check_reply(recv_frame(conn.sock)):
                pass
        assert exc.value.code == "INVALID_ARGUMENT"
        os.close(fd)
    finally:
        conn.close()
    assert daemon.proc.poll() is None
    with KVStoreClient(daemon.url, timeout=10) as c:  # what was stored is still right
        got = c.get([x.key for x in stored])
        assert all(same(g, x) for g, x in zip(got, stored, strict=True))
    _still_serves(daemon, f"after-get-{shrink_to}")


def test_a_region_shrunk_after_attach_fails_its_put_not_the_daemon(daemon):
    chunks = [chunk(i, size=300_000, tag="shrink-put") for i in range(4)]
    with KVStoreClient(daemon.url, timeout=10, transport="stream") as c:
        conn = c._take("stream")
    try:
        fd = _attach_own_region(conn)
        m = mmap.mmap(fd, SIZE)
        view = np.frombuffer(m, dtype=np.uint8)
        pos, offsets = 0, []
        for x in chunks:
            view[WINDOW_START + pos : WINDOW_START + pos + x.header.nbytes] = np.frombuffer(
                bytes(x.payload), np.uint8
            )
            offsets.append(pos)
            pos += x.header.nbytes
        del view
        m.close()
        os.ftruncate(fd, WINDOW_START + 1000)  # the first payload is cut off mid-way
        groups = put_groups(chunks, [x.header.nbytes for x in chunks], offsets)
        send_frame(
            conn.sock,
            {
                "op": "put",
                "chunks": groups,
                "region": True,
                "offset": WINDOW_START,
                "length": SIZE - WINDOW_START,
            },
        )
        with pytest.raises(RemoteError, match="region") as exc:
            check_reply(recv_frame(conn.sock))
        assert exc.value.code == "INVALID_ARGUMENT"
        os.close(fd)
    finally:
        conn.close()
    assert daemon.proc.poll() is None
    with KVStoreClient(daemon.url, timeout=10) as c:
        assert c.lookup([x.key for x in chunks]) == []  # nothing of the torn put is stored
    _still_serves(daemon, "after-put")
