"""What the daemon says to requests it cannot serve: unknown methods and ops, messages
over its limits and bytes that are not frames; and a client that splits its puts by the
daemon's limits from the first one on."""

from __future__ import annotations

import socket

import grpc
import pytest
from daemon_proc import chunk, daemon_client, same

from kvcore.chunk import encode_prefix
from store.client import KVStoreClient, parse_url
from store.wire.proto import kvstore_pb2 as pb
from store.wire.put_frame import put_groups
from store.wire.stream import RemoteError, check_reply, recv_frame, send_buffers, send_frame

MiB = 1 << 20


@pytest.fixture(scope="module")
def client():
    args = (
        "--cpu-size",
        "64MiB",
        "--max-batch",
        "16",
        "--max-chunk-size",
        "1MiB",
        "--max-request-size",
        "4MiB",
    )
    with daemon_client(*args) as c:
        yield c


def test_unknown_grpc_methods_are_invalid_arguments(client):
    host, port = parse_url(client.url)
    with grpc.insecure_channel(f"{host}:{port}") as ch:
        calls = (  # every shape of call, to a method of the service and to another service
            lambda: ch.unary_unary("/kvstore.v1.KVStore/Frobnicate")(b"", timeout=5),
            lambda: list(ch.stream_stream("/kvstore.v1.KVStore/Put2")(iter([b""]), timeout=5)),
            lambda: list(ch.unary_stream("/other.Service/Get")(b"", timeout=5)),
        )
        for call in calls:
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown method" in exc.value.details()
    assert client.health().status == "serving"


def test_unknown_stream_op_is_an_invalid_argument_and_the_stream_goes_on(client):
    with client._borrow("stream") as conn:
        send_frame(conn.sock, {"op": "format_disk"})
        with pytest.raises(RemoteError, match="unknown op 'format_disk'") as exc:
            check_reply(recv_frame(conn.sock))
        assert exc.value.code == "INVALID_ARGUMENT"
        send_frame(conn.sock, {"op": "get", "keys": []})
        assert _get_done(conn.sock) == 0


def _get_done(sock):
    """The ``done`` count ending a get's answer (after its part frames, if any)."""
    while "part" in (reply := check_reply(recv_frame(sock))):
        pass
    return reply["done"]


def test_bytes_that_are_not_a_frame_are_answered_then_the_stream_closes(client):
    for garbage in (
        b"\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        b"\x01\x00\x00\x00\x07",  # msgpack, but not a map
        b"\xff\xff\xff\x7f",
    ):  # longer than any frame may be
        conn = client._take("stream")  # authenticated: past hello
        try:
            conn.sock.sendall(garbage)
            with pytest.raises(RemoteError) as exc:
                check_reply(recv_frame(conn.sock))
            assert exc.value.code == "INVALID_ARGUMENT"
            assert conn.sock.recv(1) == b""  # then the daemon hung up
        finally:
            conn.close()


def test_health_reports_every_limit(client):
    h = client.health()
    assert (h.max_batch, h.max_chunk_bytes, h.max_request_bytes) == (16, MiB, 4 * MiB)


@pytest.mark.parametrize("transport", ["stream", "shm", "grpc"])
def test_a_fresh_client_splits_its_first_put_by_the_daemons_limits(client, transport):
    chunks = [chunk(i, size=MiB - 4096, tag="split" + transport) for i in range(10)]
    with KVStoreClient(client.url, timeout=10) as fresh:  # knows no limits yet
        assert fresh.put(chunks, transport=transport) == [True] * 10  # ~10 MiB > 4 MiB
        got = fresh.get([c.key for c in chunks], transport=transport)
    assert all(same(g, c) for g, c in zip(got, chunks, strict=True))
    many = [chunk(i, size=64, tag="batch" + transport) for i in range(40)]  # > 16 per put
    with KVStoreClient(client.url, timeout=10) as fresh:
        assert fresh.put(many, transport=transport) == [True] * 40
    keys = [c.key for c in chunks + many]
    for i in range(0, len(keys), 16):
        client.delete(keys[i : i + 16])


def test_a_stream_put_over_the_request_limit_is_refused_and_read_to_its_end(client):
    chunks = [chunk(i, size=MiB, tag="over") for i in range(5)]  # 5 MiB > 4 MiB
    with client._borrow("stream") as conn:
        send_frame(conn.sock, {"op": "put", "chunks": put_groups(chunks, [MiB] * 5)})
        send_buffers(conn.sock, [c.payload for c in chunks])  # all of it: no broken pipe
        with pytest.raises(RemoteError, match="request limit") as exc:
            check_reply(recv_frame(conn.sock))
        assert exc.value.code == "INVALID_ARGUMENT"
        send_frame(conn.sock, {"op": "get", "keys": [chunks[0].key]})  # still in step
        assert _get_done(conn.sock) == 1
    assert client.lookup([c.key for c in chunks]) == []


def test_grpc_messages_up_to_a_whole_request_reach_the_checks(client):
    big = chunk(1, size=3 * MiB, tag="grpc-big")  # over the chunk limit, under the request's
    msg = pb.PutRequest(
        chunks=[pb.Chunk(header=encode_prefix(big.header), payload=bytes(big.payload))]
    )
    with pytest.raises(RemoteError, match="exceeds the limit") as exc:
        client._call("Put", iter([msg]))
    assert exc.value.code == "INVALID_ARGUMENT"
    huge = pb.PutRequest(chunks=[pb.Chunk(header=b"", payload=bytes(6 * MiB))])
    with pytest.raises(RemoteError) as exc:  # larger than any put: gRPC's own limit
        client._call("Put", iter([huge]))
    assert exc.value.code == "RESOURCE_EXHAUSTED"
    assert client.lookup([big.key]) == []


def test_a_client_that_never_finishes_its_put_costs_only_its_connection(client):
    # A put frame then silence: the daemon waits on that connection alone.
    c = chunk(3, size=4096, tag="silent")
    with socket.create_connection(
        ("127.0.0.1", client._stream_port or client.health().stream_port)
    ) as s:
        send_frame(s, {"op": "hello", "token": None, "client": "silent"})
        check_reply(recv_frame(s))
        send_frame(s, {"op": "put", "chunks": put_groups([c], [4096])})
        assert client.put([chunk(4, tag="other")]) == [True]  # others are served meanwhile
    assert client.lookup([c.key]) == []


def test_a_put_naming_more_chunks_than_the_batch_limit_is_refused_before_any_check(client):
    # A frame of ~1 MiB can name a million chunks; the count is refused first.
    group = [b"", 0, list(range(1_000_000)), [], []]
    with client._borrow("stream") as conn:
        send_frame(conn.sock, {"op": "put", "chunks": [group]})
        with pytest.raises(RemoteError, match="batch limit of 16") as exc:
            check_reply(recv_frame(conn.sock))
        assert exc.value.code == "INVALID_ARGUMENT"
        send_frame(conn.sock, {"op": "get", "keys": []})  # in step: no payload was declared
        assert _get_done(conn.sock) == 0
