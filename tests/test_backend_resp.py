"""The redis tier's own reply reader: GET replies land in caller buffers, checked, in step."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from backends.resp import ChunkReplyReader, ProtocolError, pack_gets
from kvcore.chunk import CheckedChunk, ChunkError, HeaderCache, encode, make_chunk

FP = b"\x05" * 32


def chunk(i: int, size: int = 5000):
    data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
    return make_chunk(f"{i:064d}", FP, data, 1, dtype="uint8")


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def reader_fed(stream: bytes, piece: int = 0) -> tuple[ChunkReplyReader, socket.socket]:
    """A reader over a socket pair whose far end sends ``stream`` (in ``piece``-byte
    sends when given, to cut replies at every possible place) and then closes."""
    near, far = socket.socketpair()
    near.settimeout(5)

    def feed() -> None:
        step = piece or len(stream) or 1
        for i in range(0, len(stream), step):
            far.sendall(stream[i : i + step])
        far.close()

    threading.Thread(target=feed, daemon=True).start()
    return ChunkReplyReader(near, HeaderCache(), fill=64), near


def test_pack_gets_is_resp():
    assert (
        pack_gets([b"a", b"bc"]) == b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$2\r\nbc\r\n"
    )


@pytest.mark.parametrize("piece", [0, 1, 7, 100])
def test_replies_land_in_the_callers_buffers_in_order(piece):
    a, b = chunk(1), chunk(2, size=300)
    stream = bulk(encode(a)) + b"$-1\r\n" + bulk(encode(b)) + b"_\r\n" + bulk(encode(a))
    reader, sock = reader_fed(stream, piece)
    out_a = np.zeros(5000, np.uint8)
    out_b = np.full(400, 9, np.uint8)  # larger than the payload: the tail stays as it was
    got = [
        reader.read_chunk(a.key, out_a),
        reader.read_chunk(a.key, None),
        reader.read_chunk(b.key, out_b),
        reader.read_chunk(a.key, None),
        reader.read_chunk(a.key, None),
    ]
    assert isinstance(got[0], CheckedChunk) and got[0].header == a.header
    assert np.shares_memory(got[0].payload, out_a) and bytes(out_a) == bytes(a.payload)
    assert got[1] is None and got[3] is None
    assert bytes(out_b[:300]) == bytes(b.payload) and (out_b[300:] == 9).all()
    assert bytes(got[4].payload) == bytes(a.payload)  # no buffer: a fresh one
    sock.close()


def test_damaged_values_are_errors_and_the_stream_stays_in_step():
    good = chunk(3)
    flipped = bytearray(encode(good))
    flipped[-1] ^= 0x01
    bad_magic = b"XXXX" + encode(good)[4:]
    stream = b"".join(
        [
            bulk(b"short"),
            bulk(bad_magic),
            bulk(bytes(flipped)),
            b"-WRONGTYPE not a string\r\n",
            bulk(encode(good)[:-1] + b"\x00"),
            bulk(encode(good)),
        ]
    )
    reader, sock = reader_fed(stream, 13)
    out = np.empty(5000, np.uint8)
    errors = [reader.read_chunk(good.key, out) for _ in range(5)]
    assert all(isinstance(e, ChunkError) for e in errors)
    assert "checksum" in str(errors[2]) and "WRONGTYPE" in str(errors[3])
    last = reader.read_chunk(good.key, out)
    assert isinstance(last, CheckedChunk) and bytes(out) == bytes(good.payload)
    sock.close()


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (b"-LOADING Redis is loading the dataset in memory\r\n", "LOADING"),
        (b"$12x\r\n", "bulk length"),
        (b":1\r\n", "unexpected"),
    ],
)
def test_server_errors_and_a_garbled_stream_fail_the_read(stream, match):
    reader, sock = reader_fed(stream)
    with pytest.raises(ProtocolError, match=match):
        reader.read_chunk("k" * 64, None)
    sock.close()


def test_a_cut_stream_and_a_small_buffer_raise():
    c = chunk(4)
    reader, sock = reader_fed(bulk(encode(c))[:-100])
    with pytest.raises(ProtocolError):
        reader.read_chunk(c.key, np.empty(5000, np.uint8))
    sock.close()
    reader, sock = reader_fed(bulk(encode(c)))
    with pytest.raises(ValueError, match="too small"):
        reader.read_chunk(c.key, np.empty(10, np.uint8))
    sock.close()
