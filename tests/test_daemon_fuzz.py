"""Bounded fuzzing of the daemon's two network surfaces, with a fixed seed: random and
mutated gRPC messages to every method (with and without the token), and random and
mutated stream frames and garbage, before and after hello. Every answer must be a
status or frame the API documents; afterwards the daemon must be alive, have logged no
traceback, and still store and return the right bytes."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable

import grpc
import msgpack
import pytest
from daemon_probe import answers, connect, frame, hello, output, stream_port
from daemon_proc import FP, chunk, key, same, start_daemon

from kvcore.chunk import encode_prefix
from store.client import KVStoreClient
from store.wire.proto import kvstore_pb2 as pb
from store.wire.put_frame import put_groups
from store.wire.stream import check_reply

TOKEN = "fuzz-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SEED = 13
BUDGET_S = 25  # each test stops early past this, whatever it has done
GRPC_CALLS = 3000
STREAM_CASES = 2000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN)
    d = start_daemon(
        "--cpu-size",
        "32MiB",
        "--auth-token-file",
        str(path),
        "--max-batch",
        "64",
        "--max-request-size",
        "4MiB",
        "--handshake-timeout",
        "5",
    )
    yield d
    output(d)
    assert d.terminate() == 0


def _assert_healthy(daemon, tag: str) -> None:
    """Alive, silent about errors, and a good put and get return the right bytes."""
    log = output(daemon)
    assert "Traceback" not in log, log[-3000:]
    assert daemon.proc.poll() is None
    for transport in ("grpc", "stream"):
        c = chunk(3, size=20000, tag=tag + transport)
        with KVStoreClient(daemon.url, TOKEN, timeout=10, transport=transport) as client:
            assert client.health().status == "serving"
            assert client.put([c]) == [True]
            assert same(client.get([c.key])[0], c)


# -- mutation -------------------------------------------------------------------------
def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """``data`` changed by one to three random edits."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        pos = rng.randint(0, len(b))
        if kind == 0 and b:  # flip bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # cut
            del b[rng.randint(0, len(b)) :]
        elif kind == 2:  # insert random bytes
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3 and b:  # a boundary value
            b[rng.randrange(len(b))] = rng.choice((0x00, 0x7F, 0x80, 0xFF, 0xC1, 0xDD, 0xDF))
        elif kind == 4:  # repeat a slice
            j = rng.randint(pos, len(b))
            b[pos:pos] = b[pos:j] * rng.randint(1, 4)
        elif kind == 5:  # splice in another message
            other = rng.choice(others)
            b[pos:] = other[rng.randint(0, len(other)) :]
        else:  # delete a slice
            del b[pos : pos + rng.randint(1, 8)]
    return bytes(b)


def random_value(rng: random.Random, depth: int = 0) -> object:
    """A random msgpack value, sometimes nested."""
    kinds: list[Callable[[], object]] = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**63), 2**64 - 1),
        lambda: rng.randint(-2, 70),
        lambda: rng.random() * 1e300,
        lambda: "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 70))),
        lambda: rng.randbytes(rng.randint(0, 40)),
        lambda: key(rng.randint(0, 9), "fuzz"),
    ]
    if depth < 3:
        kinds.append(lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))])
        kinds.append(
            lambda: {
                str(random_value(rng, 3))[:8]: random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 4))
            }
        )
    return rng.choice(kinds)()


# -- gRPC -----------------------------------------------------------------------------
def _grpc_bases() -> dict[str, list[bytes]]:
    keys = [key(i, "fuzz-grpc") for i in range(4)]
    c = chunk(1, size=2048, tag="fuzz-grpc")
    put = pb.PutRequest(
        fingerprint=FP, chunks=[pb.Chunk(header=encode_prefix(c.header), payload=bytes(c.payload))]
    )
    return {
        "Lookup": [pb.LookupRequest(keys=keys).SerializeToString()],
        "Put": [put.SerializeToString()],
        "Get": [pb.GetRequest(keys=keys, fingerprint=FP).SerializeToString()],
        "Delete": [pb.DeleteRequest(keys=keys[2:]).SerializeToString()],
        "Stats": [b""],
        "Health": [b""],
        "Lease": [pb.LeaseRequest(keys=keys, ttl_seconds=2).SerializeToString()],
        "Release": [pb.ReleaseRequest(lease_id="0123456789abcdef").SerializeToString()],
    }


def _call(ch: grpc.Channel, method: str, messages: list[bytes], metadata) -> grpc.StatusCode:
    path = f"/kvstore.v1.KVStore/{method}"
    try:
        if method == "Put":
            ch.stream_unary(path)(iter(messages), timeout=10, metadata=metadata)
        elif method == "Get":
            list(ch.unary_stream(path)(messages[0], timeout=10, metadata=metadata))
        else:
            ch.unary_unary(path)(messages[0], timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_random_and_mutated_grpc_messages_get_documented_answers(daemon):
    rng = random.Random(SEED)
    bases = _grpc_bases()
    everything = [m for ms in bases.values() for m in ms]
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }  # RESOURCE_EXHAUSTED: the lease caps
    seen: dict[grpc.StatusCode, int] = {}
    deadline = time.monotonic() + BUDGET_S
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as ch:
        for i in range(GRPC_CALLS):
            if time.monotonic() > deadline:
                break
            method = rng.choice(list(bases))
            count = rng.randint(1, 3) if method == "Put" else 1
            messages = [
                rng.randbytes(rng.randint(0, 300))
                if rng.random() < 0.15
                else mutate(rng, rng.choice(bases[method]), everything)
                for _ in range(count)
            ]
            authed = rng.random() < 0.8
            code = _call(ch, method, messages, AUTH if authed else ())
            seen[code] = seen.get(code, 0) + 1
            want = allowed if authed else {grpc.StatusCode.UNAUTHENTICATED}
            assert code in want, (i, method, authed, code, messages)
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100, seen  # the fuzz reached the checks
    _assert_healthy(daemon, "after-grpc-fuzz")


# -- the stream -----------------------------------------------------------------------
def _stream_bases() -> list[tuple[dict, bytes]]:
    """Request frames (meta, and payload bytes that follow it)."""
    keys = [key(i, "fuzz-get") for i in range(3)]
    c = chunk(2, size=1024, tag="fuzz-put")
    name = "kvstore-" + "ab" * 16
    groups = put_groups([c], [1024])
    return [
        ({"op": "hello", "token": TOKEN, "client": "fuzz"}, b""),
        ({"op": "get", "keys": keys, "fp": FP}, b""),
        (
            {"op": "get", "keys": keys, "region": True, "offset": 64, "length": 4096, "pool": True},
            b"",
        ),
        ({"op": "put", "chunks": groups, "fp": FP}, bytes(c.payload)),
        (
            {
                "op": "put",
                "chunks": put_groups([c], [1024], [0]),
                "region": True,
                "offset": 64,
                "length": 4096,
            },
            b"",
        ),
        ({"op": "put", "chunks": groups, "cma": [1 << 20]}, b""),
        ({"op": "attach", "name": name, "nonce": b"\x01" * 16, "at": 4096}, b""),
        ({"op": "cma"}, b""),
        ({"op": "release"}, b""),
        ({"op": "ucx", "address": b"\x00" * 32}, b""),
    ]


def _fuzz_bytes(rng: random.Random, bases: list[tuple[dict, bytes]]) -> bytes:
    """One case's bytes: garbage, a random frame, or a request frame mutated."""
    meta, payload = rng.choice(bases)
    roll = rng.random()
    if roll < 0.1:
        return rng.randbytes(rng.randint(0, 1 << rng.randint(1, 16)))
    if roll < 0.3:  # a frame of random values, or a request with one field replaced
        if rng.random() < 0.5:
            return frame(random_value(rng))
        meta = dict(meta)
        meta[rng.choice([*meta, "op", "x"])] = random_value(rng)
        return frame(meta) + payload
    raw = msgpack.packb(meta)
    if rng.random() < 0.8:  # the body mutated, the length right
        body = mutate(rng, raw, [msgpack.packb(m) for m, _ in bases])
        return len(body).to_bytes(4, "little") + body + payload
    return mutate(rng, len(raw).to_bytes(4, "little") + raw, [raw]) + payload


def test_random_and_mutated_stream_frames_get_documented_answers(daemon):
    rng = random.Random(SEED)
    bases = _stream_bases()
    port = stream_port(daemon, TOKEN)
    codes = {
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "FAILED_PRECONDITION",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
    }
    errors = 0
    deadline = time.monotonic() + BUDGET_S
    for i in range(STREAM_CASES):
        if time.monotonic() > deadline:
            break
        greet = rng.random() < 0.6  # after hello; else before it
        data = _fuzz_bytes(rng, bases)
        with connect(port) as s:
            if greet:
                assert check_reply(hello(s, TOKEN))["ok"]
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)  # the daemon reads to the end, answers, closes
            except OSError:  # it hung up first (a pipe, a reset, not connected): fine,
                pass  # if it answered in the right form
            got = answers(s)
        for reply in got:
            fine = "ok" in reply or reply.get("part") == [] or reply.get("error") in codes
            assert fine, (i, greet, data[:200], reply)  # (a part of no hits: nothing stored)
            errors += "error" in reply
    assert errors > 200  # the fuzz reached the checks
    _assert_healthy(daemon, "after-stream-fuzz")
