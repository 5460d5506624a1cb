"""Shared-memory puts by cross-memory attach: the daemon reads payloads out of the
client's own memory (store/wire/cma.py), checked like any other put."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from daemon_proc import chunk, same, start_daemon

from store.client import KVStoreClient
from store.wire import cma
from store.wire.put_frame import put_groups
from store.wire.same_host import redeem
from store.wire.shm import Region
from store.wire.stream import RemoteError, check_reply, recv_frame, send_frame

MiB = 1 << 20
ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not cma.available(), reason="no process_vm_readv (not Linux)")


def test_read_gathers_and_scatters_across_ranges_of_a_process():
    src = np.arange(10_000, dtype=np.uint32).view(np.uint8)
    a, b = np.zeros(15_000, np.uint8), np.zeros(25_000, np.uint8)
    base = cma.address(src)
    cma.read(os.getpid(), [a, b], [(base, 30_000), (base + 30_000, 10_000)])
    assert bytes(a) + bytes(b) == bytes(src)
    many = [np.zeros(3, np.uint8) for _ in range(cma.IOV_MAX + 5)]  # more than one call
    cma.read(os.getpid(), many, [(base, 3 * len(many))])
    assert b"".join(bytes(m) for m in many) == bytes(src[: 3 * len(many)])
    with pytest.raises(OSError):
        cma.read(os.getpid(), [a], [(8, a.nbytes)])  # nothing is mapped there
    with pytest.raises(ValueError):
        cma.read(os.getpid(), [a], [(base, 1)])


def test_address_of_writable_and_read_only_views_alike():
    buf = np.zeros(1 << 16, np.uint8)
    view = memoryview(buf)[4096:]
    want = buf.ctypes.data + 4096
    assert cma.address(view) == cma.address(view.toreadonly()) == want
    assert cma.address(bytes(4)) != 0 and cma.address(view[:0]) == 0


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon("--cpu-size", "64MiB", "--max-request-size", "16MiB")
    yield d
    assert d.terminate() == 0


def _cma_conn(client):
    conn = client._take("shm")
    assert conn.cma, "the daemon could not read this process (ptrace not permitted here?)"
    return conn


def test_shm_puts_are_read_from_the_clients_memory(daemon):
    chunks = [chunk(i, size=MiB + 2 * i, tag="cma") for i in range(6)]
    with KVStoreClient(daemon.url, transport="shm") as c:
        conn = _cma_conn(c)
        c._release(conn, True)
        assert c.put(chunks) == [True] * 6
        got = c.get([x.key for x in chunks], transport="stream")
        assert all(same(g, x) for g, x in zip(got, chunks, strict=True))
        c.delete([x.key for x in chunks])


def _put_frame(conn, chunks, addrs):
    groups = put_groups(chunks, [x.header.nbytes for x in chunks])
    send_frame(conn.sock, {"op": "put", "chunks": groups, "cma": addrs})
    return recv_frame(conn.sock)


def test_unreadable_or_wrong_payloads_refuse_the_whole_put(daemon):
    good = [chunk(i, size=3 * MiB, tag="cma-bad") for i in range(4)]  # 12 MiB: 3 groups
    older = chunk(99, size=4096, tag="cma-bad")
    with KVStoreClient(daemon.url, transport="shm") as c:
        assert c.put([older]) == [True]
        conn = _cma_conn(c)
        views = [np.asarray(x.payload).reshape(-1).view(np.uint8) for x in good]
        addrs = [cma.address(v) for v in views]
        for bad in (
            addrs[:3] + [8],  # the last group cannot be read
            addrs[:3] + [cma.address(views[0])],  # readable, but another chunk's bytes
            addrs[:3] + [-1],
            addrs[:3],  # one address short
        ):
            reply = _put_frame(conn, good, bad)
            assert reply.get("error") == "INVALID_ARGUMENT", reply
        c._release(conn, True)  # still in step after every refusal
        assert c.get([x.key for x in good]) == [None] * 4  # nothing of them stored
        assert same(c.get([older.key])[0], older)  # and what was there is untouched


def test_a_connection_that_proved_nothing_cannot_ask_for_reads(daemon):
    x = chunk(1, size=4096, tag="cma-stream")
    with KVStoreClient(daemon.url, transport="stream") as c:
        c.health()
        with c._borrow("stream") as conn:
            reply = _put_frame(conn, [x], [cma.address(np.asarray(x.payload).reshape(-1))])
            with pytest.raises(RemoteError, match="INVALID_ARGUMENT.*cannot read"):
                check_reply(reply)
        assert c.get([x.key]) == [None]


def _reattach(conn, at=None):
    """Attach a fresh region on ``conn``; the daemon's offer at its same-host door."""
    region = Region.create(4096)
    try:
        send_frame(
            conn.sock,
            {
                "op": "attach",
                "name": region.name,
                "nonce": region.nonce,
                "at": cma.address(region.array) if at is None else at,
            },
        )
        return region, check_reply(recv_frame(conn.sock))["door"]
    finally:
        region.unlink()


def _redeemed(offer) -> bool:
    came_in, fd = redeem(offer, 5.0)
    if fd is not None:
        os.close(fd)
    return came_in


def _ask_cma(conn) -> bool:
    send_frame(conn.sock, {"op": "cma"})
    return check_reply(recv_frame(conn.sock))["cma"]


def test_reads_need_the_kernels_word_on_who_the_client_is(daemon):
    with KVStoreClient(daemon.url, transport="shm") as c:
        conn = _cma_conn(c)
        region, offer = _reattach(conn)
        assert not _ask_cma(conn)  # the ticket was never redeemed: no pid, no reads
        region.close()
        # Redeemed by another process (which has no such region mapped there): no reads,
        # though the address and nonce are right for this one.
        region, offer = _reattach(conn)
        code = (
            "import json, sys; from store.wire.same_host import redeem; "
            "print(redeem(json.loads(sys.argv[1]), 5.0)[0])"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(offer)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        assert out.strip() == "True" and not _ask_cma(conn)
        region.close()
        # Redeemed by this process, but naming an address where the nonce is not: no reads.
        other = np.zeros(64, np.uint8)
        region, offer = _reattach(conn, at=cma.address(other))
        assert _redeemed(offer) and not _ask_cma(conn)
        region.close()
        # And the honest way, for contrast.
        region, offer = _reattach(conn)
        assert _redeemed(offer) and _ask_cma(conn)
        region.close()
        conn.close()


FALLBACK = """
import sys
import numpy as np
sys.path.insert(0, "tests")
from daemon_proc import chunk
from store.client import KVStoreClient
with KVStoreClient(sys.argv[1], transport="shm") as c:
    first = [chunk(i, size=65536, tag="fallback") for i in range(3)]
    assert c.put(first) == [True] * 3
    conn = c._idle[0]
    assert conn.cma
    # What the daemon reads before every put is gone (as when the pid no longer is this
    # process, or its memory became unreadable): the daemon refuses to read.
    conn.region.array[:16] = 0
    later = [chunk(i, size=65536, tag="fallback-later") for i in range(3)]
    assert c.put(later) == [True] * 3  # refused by the daemon, then sent through the region
    assert not conn.cma
    got = c.get([x.key for x in later])
    assert all(bytes(np.asarray(g.payload)) == bytes(x.payload) for g, x in zip(got, later))
    print("ok")
"""


def test_a_put_the_daemon_cannot_read_falls_back_to_the_region(daemon):
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK, daemon.url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
