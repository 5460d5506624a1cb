"""gRPC messages are refused before they are parsed (issue 13, item 4): an
unauthenticated call before its message is read, a message larger than its method needs
before it is decoded; bytes that are not the method's message are INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest
from daemon_probe import PeakMemory, output
from daemon_proc import chunk, same, start_daemon

from store.client import KVStoreClient

TOKEN = "grpc-hardening-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MiB = 1 << 20
METHODS = ("Lookup", "Put", "Get", "Delete", "Stats", "Health", "Lease", "Release")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN)
    d = start_daemon(
        "--cpu-size", "32MiB", "--auth-token-file", str(path), "--max-request-size", "64MiB"
    )
    yield d
    assert "Traceback" not in output(d)
    assert d.terminate() == 0


@pytest.fixture(scope="module")
def channel(daemon):
    options = [("grpc.max_send_message_length", 1 << 30)]
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}", options=options) as ch:
        yield ch


def call(channel, method: str, data: bytes, metadata=(), timeout: float = 30) -> tuple:
    """``data`` sent as the request of ``method``, raw; the status of the answer."""
    path = f"/kvstore.v1.KVStore/{method}"
    try:
        if method == "Put":
            channel.stream_unary(path)(iter([data]), timeout=timeout, metadata=metadata)
        elif method == "Get":
            list(channel.unary_stream(path)(data, timeout=timeout, metadata=metadata))
        else:
            channel.unary_unary(path)(data, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _many_keys(nbytes: int) -> bytes:
    """A LookupRequest of ``nbytes`` holding one-character keys: three bytes each on the
    wire, a Python string each once parsed."""
    return b"\x0a\x01a" * (nbytes // 3)


@pytest.mark.parametrize("auth", [(), AUTH], ids=["unauthenticated", "authenticated"])
def test_a_large_lookup_is_refused_before_it_is_parsed(daemon, channel, auth):
    """A 24 MB Lookup of 8 M keys used to be parsed (gigabytes of memory) before it was
    refused; without the token it is now refused before it is read, with the token
    before it is parsed. Peak memory moves by about the message's size at most."""
    peak = PeakMemory(daemon.proc.pid)
    peak.start()
    code, details = call(channel, "Lookup", _many_keys(24 * MiB), auth)
    grown = peak.grown()
    assert grown < (24 if auth else 8) * MiB + 64 * MiB, f"peak memory grew by {grown >> 20} MiB"
    if auth:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds" in details and "Lookup" in details
    else:
        assert code == grpc.StatusCode.UNAUTHENTICATED
    _assert_serves(daemon, "after-large")


@pytest.mark.parametrize("method", METHODS)
def test_bytes_that_are_not_the_methods_message_are_invalid_arguments(channel, method):
    for data in (b"\xff", b"\x0a\x05ab", b"\x0f"):  # a cut varint, a cut string, wire type 7
        code, details = call(channel, method, data, AUTH)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (data, code, details)
        assert f"malformed {method} request" in details
    code, _ = call(channel, method, b"\xff")  # without the token: refused unread
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_keys_that_are_not_utf8_are_invalid_arguments(channel):
    code, details = call(channel, "Lookup", b"\x0a\x02\xff\xfe", AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed Lookup" in details


def test_a_put_may_still_carry_a_whole_request(daemon):
    """Put keeps the server-wide message limit: a 12 MiB chunk goes in one message."""
    with KVStoreClient(daemon.url, TOKEN, timeout=30, transport="grpc") as client:
        c = chunk(5, size=12 * MiB, tag="big-put")
        assert client.put([c]) == [True]
        assert same(client.get([c.key])[0], c)


def _assert_serves(daemon, tag: str) -> None:
    c = chunk(7, size=4096, tag=tag)
    with KVStoreClient(daemon.url, TOKEN, timeout=10, transport="grpc") as client:
        assert client.put([c]) == [True]
        assert same(client.get([c.key])[0], c)
