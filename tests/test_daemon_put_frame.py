"""A stream put names its chunks in columns (store/wire/put_frame.py): grouping on the client,
the daemon's checks of every column, and what a refused or torn put leaves behind."""

from __future__ import annotations

import time

import numpy as np
import pytest
from daemon_proc import FP, chunk, daemon_client, key, same

from kvcore.chunk import make_chunk
from kvcore.keys import chunk_key
from store.wire.put_frame import HASHES, HEADER, KEYS, XXH3S, put_groups
from store.wire.stream import RemoteError, check_reply, recv_frame, send_buffers, send_frame


@pytest.fixture(scope="module")
def client():
    with daemon_client("--cpu-size", "32MiB", "--max-batch", "64", "--max-chunk-size", "2MiB") as c:
        yield c


def _sizes(chunks):
    return [c.header.nbytes for c in chunks]


def test_alike_neighbours_share_a_group_and_others_start_one():
    chunks = [chunk(i, size=4096, tag="g") for i in range(3)]
    chunks += [chunk(3, size=2048, tag="g"), chunk(4, size=4096, tag="g")]
    chunks += [chunk(5, size=4096, tag="g", fp=b"\x01" * 32)]
    groups = put_groups(chunks, _sizes(chunks))
    assert [len(g[KEYS]) for g in groups] == [3, 1, 1, 1]
    assert groups[0][KEYS] == [c.key for c in chunks[:3]]
    assert groups[0][XXH3S] == [c.header.checksum for c in chunks[:3]]
    assert all(g[HASHES] == [] for g in groups)
    # the size as sent is part of what makes chunks alike, whatever the headers say
    assert len(put_groups(chunks[:2], [4096, 4095])) == 2


@pytest.mark.parametrize("transport", ["stream", "shm"])
def test_mixed_chunks_round_trip_with_their_own_headers(client, transport):
    chunks = [chunk(i, size=4096 if i % 3 else 1024, tag="mix" + transport) for i in range(9)]
    assert client.put(chunks, transport=transport) == [True] * 9
    got = client.get([c.key for c in chunks], transport=transport)
    assert all(same(g, c) for g, c in zip(got, chunks, strict=True))
    client.delete([c.key for c in chunks])


def _put_raw(conn, groups, payloads, fp=None):
    """Send one inline put frame and its payloads on stream connection ``conn``; the reply."""
    send_frame(conn.sock, {"op": "put", "fp": fp, "chunks": groups})
    send_buffers(conn.sock, [memoryview(p).cast("B") for p in payloads])
    return check_reply(recv_frame(conn.sock))


def test_every_column_is_checked_and_a_refused_put_stores_nothing(client):
    chunks = [chunk(i, tag="cols") for i in range(3)]
    keys = [c.key for c in chunks]
    payloads = [c.payload for c in chunks]

    def groups():
        return put_groups(chunks, _sizes(chunks))

    def first_header_of_another_chunk(g):
        g[0][HEADER] = put_groups([chunk(9, tag="cols")], [4096])[0][HEADER]

    def checksum_out_of_range(g):
        g[0][XXH3S][1] = -1

    def checksum_not_an_integer(g):
        g[0][XXH3S][1] = "1"

    def one_checksum_short(g):
        g[0][XXH3S].pop()

    def malformed_key(g):
        g[0][KEYS][2] = key(2, "cols")[:-1] + "G"

    def wrong_block_hash(g):
        g[0][HASHES] = [b"\x05" * 32] * 3

    def some_block_hashes(g):
        g[0][HASHES] = [b"\x05" * 32]

    def wrong_checksum(g):
        g[0][XXH3S][1] ^= 1

    cases = (
        first_header_of_another_chunk,
        checksum_out_of_range,
        checksum_not_an_integer,
        one_checksum_short,
        malformed_key,
        wrong_block_hash,
        some_block_hashes,
        wrong_checksum,
    )
    with client._borrow("stream") as conn:  # one connection: each refusal keeps it in step
        for tamper in cases:
            g = groups()
            tamper(g)
            with pytest.raises(RemoteError) as exc:
                _put_raw(conn, g, payloads)
            assert exc.value.code == "INVALID_ARGUMENT", tamper.__name__
            assert client.lookup(keys) == [], tamper.__name__
        assert _put_raw(conn, groups(), payloads)["stored"] == [True] * 3
    assert all(same(g, c) for g, c in zip(client.get(keys), chunks, strict=True))
    client.delete(keys)


def test_block_hashes_name_each_key(client):
    blocks = [bytes([i]) * 32 for i in range(3)]
    kv = np.zeros((1, 2, 4, 1, 1), np.uint8)
    chunks = [
        make_chunk(chunk_key(FP, b), FP, kv + i, 4, dtype="uint8") for i, b in enumerate(blocks)
    ]
    g = put_groups(chunks, _sizes(chunks))
    g[0][HASHES] = blocks
    with client._borrow("stream") as conn:
        assert _put_raw(conn, g, [c.payload for c in chunks], fp=FP)["stored"] == [True] * 3
    assert client.lookup([c.key for c in chunks]) == ["cpu"] * 3
    client.delete([c.key for c in chunks])


def test_a_put_torn_off_mid_payload_leaves_nothing_stored(client):
    chunks = [chunk(i, size=(1 << 20) - 4096, tag="torn") for i in range(4)]  # several groups
    keys = [c.key for c in chunks]
    conn = client._take("stream")
    try:
        send_frame(conn.sock, {"op": "put", "chunks": put_groups(chunks, _sizes(chunks))})
        send_buffers(conn.sock, [c.payload for c in chunks[:3]])  # the last one never comes
    finally:
        conn.close()
    for _ in range(100):  # the daemon sees the end of the stream, frees the pages
        if client.stats().tiers[0].bytes_used == 0:
            break
        time.sleep(0.05)
    assert client.lookup(keys) == []
    assert client.stats().tiers[0].bytes_used == 0  # no reserved page left behind
