"""The daemon as a process: auth, kill -9 mid-use, restart with the disk tier, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import time
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from daemon_proc import FP, chunk, same, scrape, start_daemon

from backends.remote import RemoteBackend
from benchmarks.harness import wait_until
from store.cli import main
from store.client import KVStoreClient
from store.config import from_flat
from store.tiered import TieredStore
from store.wire.put_frame import put_groups
from store.wire.stream import RemoteError, recv_frame, send_buffers, send_frame


def test_a_token_is_required_when_configured(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = start_daemon("--auth-token-file", str(token), "--cpu-size", "16MiB")
    try:
        c = chunk(1, tag="auth")
        for wrong in (None, "nope"):
            with KVStoreClient(d.url, token=wrong) as anon:
                for call in (
                    lambda: anon.lookup([c.key]),
                    lambda: anon.put([c], transport="grpc"),
                    lambda: anon.put([c], transport="stream"),
                    lambda: anon.stats(),
                ):
                    with pytest.raises(RemoteError) as exc:
                        call()
                    assert exc.value.code == "UNAUTHENTICATED"
        with grpc.insecure_channel(f"127.0.0.1:{d.port}") as ch:  # health too
            with pytest.raises(grpc.RpcError) as exc:
                ch.unary_unary("/kvstore.v1.KVStore/Health")(b"", timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with KVStoreClient(d.url, token="s3cret") as ok:
            assert ok.put([c]) == [True] and ok.lookup([c.key]) == ["cpu"]
        anon_tier = RemoteBackend(d.url)  # a tier without the token: misses, not crashes
        assert anon_tier.contains([c.key]) == 0 and anon_tier.get([c.key]) == [None]
        anon_tier.close()
        authed = RemoteBackend(d.url, token_file=str(token))
        assert authed.contains([c.key]) == 1
        authed.close()
    finally:
        assert d.terminate() == 0


def test_kill_9_means_misses_not_hangs_and_a_restart_keeps_disk_hits(tmp_path):
    disk = str(tmp_path / "disk")
    d = start_daemon("--cpu-size", "16MiB", "--disk-path", disk, "--set", "disk.fsync=false")
    config = from_flat(
        {
            "tiers": ["cpu", d.url],
            "cpu.size": "1MiB",
            "cpu.page_size": "4KiB",
            "remote.timeout": 2.0,
            "remote.retry_after": 0.2,
            "workers": 1,
        }
    )
    kv = np.ones((1, 2, 16, 4, 32), np.float16)  # 8 KiB
    keys = [chunk(i, tag="kill").key for i in range(4)]
    with TieredStore(config, FP) as store:
        assert store.put([store.make_chunk(k, kv * i, 16) for i, k in enumerate(keys)]) == 4
        store.tiers[0].backend.delete(keys)  # only the daemon holds them now
        assert store.lookup(keys) == 4
        d.kill()
        start = time.monotonic()
        assert store.lookup(keys) == 0
        assert store.get(keys) == [None] * 4
        assert store.put([store.make_chunk(keys[0], kv, 16)]) == 1  # the cpu tier still takes it
        assert time.monotonic() - start < 5
        store.tiers[0].backend.delete(keys)

        d = start_daemon("--cpu-size", "16MiB", "--disk-path", disk, port=d.port)
        try:
            deadline = time.monotonic() + 15  # back-off, then reconnect
            while store.lookup(keys) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert store.locate(keys) == ["remote"] * 4
            with KVStoreClient(d.url) as c:
                assert c.lookup(keys) == ["disk"] * 4  # the files of the first run
            outs = [np.empty_like(kv) for _ in keys]
            assert all(g is not None for g in store.get(keys, outs))
            assert all(np.array_equal(o, kv * i) for i, o in enumerate(outs))
        finally:
            d.kill()


def _in_flight(metrics_port: int) -> float:
    """The daemon's ``kvstore_daemon_in_flight`` gauge, read from its /metrics."""
    return scrape(metrics_port)[("kvstore_daemon_in_flight", ())]


def test_sigterm_lets_an_in_flight_put_finish_then_exits_0(tmp_path):
    """A stream put is sent by hand: its frame and part of its payload, so the daemon is
    inside the request (its in-flight gauge says 1) when SIGTERM arrives. New requests
    are then refused, the rest of the payload still goes in, the put is answered stored,
    the daemon exits 0, and a restart on the same disk directory finds the chunks."""
    disk = str(tmp_path / "disk")
    tier_args = ("--cpu-size", "64MiB", "--disk-path", disk, "--set", "disk.fsync=false")
    # A long drain timeout: the test, not the timeout, ends the drain.
    d = start_daemon(*tier_args, "--drain-timeout", "30")
    chunks = [chunk(i, size=1 << 20, tag="drain") for i in range(8)]
    payloads = [memoryview(bytes(c.payload)) for c in chunks]
    try:
        with KVStoreClient(d.url, timeout=10) as control:
            stream_port = control.health().stream_port
        sock = socket.create_connection(("127.0.0.1", stream_port), timeout=10)
        send_frame(sock, {"op": "hello", "client": "drain-test"})
        assert recv_frame(sock)["ok"]
        send_frame(sock, {"op": "put", "chunks": put_groups(chunks, [p.nbytes for p in payloads])})
        send_buffers(sock, [*payloads[:3], payloads[3][:4096]])  # 3 MiB and a bit of 8
        wait_until(lambda: _in_flight(d.metrics_port) == 1, what="the put to be in flight")

        d.proc.send_signal(signal.SIGTERM)
        with KVStoreClient(d.url, timeout=10, transport="stream") as late:
            wait_until(lambda: late.health().status == "draining", what="draining")
            with pytest.raises(RemoteError) as exc:
                late.lookup([chunks[0].key])
            assert exc.value.code == "UNAVAILABLE"
            with pytest.raises(RemoteError) as exc:
                late.put([chunk(99, tag="late")])
            assert exc.value.code == "UNAVAILABLE"
        assert d.proc.poll() is None  # still draining: the put is not done

        send_buffers(sock, [payloads[3][4096:], *payloads[4:]])
        assert recv_frame(sock) == {"ok": True, "stored": [True] * 8}
        sock.close()
        assert d.proc.wait(20) == 0
        out = d.proc.stdout.read()
        assert "draining 1 requests in flight" in out and "kvstore serve: stopped" in out
    finally:
        d.kill()

    d = start_daemon(*tier_args)  # the put reached the disk tier before the exit
    try:
        with KVStoreClient(d.url, timeout=10, transport="stream") as c:
            keys = [x.key for x in chunks]
            assert c.lookup(keys) == ["disk"] * 8
            assert all(same(g, w) for g, w in zip(c.get(keys), chunks, strict=True))
    finally:
        assert d.terminate() == 0


@contextmanager
def _frozen(d):
    """The daemon stopped by SIGSTOP (its sockets still accept; nothing answers), then
    SIGCONT, even when the test fails."""
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)


def _timed(call) -> tuple[object, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def _times_out(call, limit: float) -> float:
    """``call`` fails on a deadline (not a refusal) within ``limit`` seconds; its time."""
    start = time.monotonic()
    with pytest.raises((RemoteError, TimeoutError)) as exc:
        call()
    elapsed = time.monotonic() - start
    assert isinstance(exc.value, TimeoutError) or exc.value.code == "DEADLINE_EXCEEDED", exc.value
    assert elapsed < limit, f"{elapsed:.2f}s"
    return elapsed


TIMEOUT = 0.5  # the deadline given to clients of a frozen daemon: the default is 5 s


def test_a_frozen_daemon_costs_a_deadline_not_a_hang_then_serves_again():
    d = start_daemon("--cpu-size", "16MiB")
    c0, c1 = chunk(0, tag="frozen"), chunk(1, tag="frozen")
    clients = {
        t: KVStoreClient(d.url, timeout=TIMEOUT, connect_timeout=TIMEOUT, transport=t)
        for t in ("stream", "grpc", "auto")
    }
    tier = RemoteBackend(d.url, timeout=TIMEOUT, connect_timeout=TIMEOUT, retry_after=1.0)
    try:
        for c in clients.values():  # connections up, stream port known, regions attached
            assert c.put([c0]) == [True] and same(c.get([c0.key])[0], c0)
        assert tier.contains([c0.key]) == 1 and same(tier.get([c0.key])[0], c0)

        with _frozen(d):
            for c in clients.values():
                # stream/auto: the get waits on its open connection, which is then
                # dropped, so the put's new connection waits on Health; grpc: both calls.
                _times_out(lambda c=c: c.get([c0.key]), 3)
                _times_out(lambda c=c: c.put([c1]), 3)
            _times_out(lambda: clients["auto"].lookup([c0.key]), 3)
            before = time.monotonic()
            got, elapsed = _timed(lambda: tier.get([c0.key]))
            assert got == [None] and elapsed < 3
            # Backing off: no call reaches the daemon, so no deadline is waited for.
            for call, miss in (
                (lambda: tier.contains([c0.key]), 0),
                (lambda: tier.get([c0.key]), [None]),
                (lambda: tier.put([c1]), [False]),
            ):
                got, elapsed = _timed(call)
                assert got == miss and elapsed < TIMEOUT / 2
            assert not tier.available()

        wait_until(tier.available, 5, "the back-off to end")
        assert time.monotonic() - before >= 1.0  # not before retry_after
        assert tier.contains([c0.key]) == 1 and same(tier.get([c0.key])[0], c0)
        assert tier.put([c1]) == [True]
        for c in clients.values():  # each client reconnects by itself
            assert same(c.get([c1.key])[0], c1) and c.put([c0]) == [True]
    finally:
        for c in clients.values():
            c.close()
        tier.close()
        assert d.terminate() == 0


def test_the_back_off_doubles_up_to_its_cap():
    """Each failure against a frozen daemon keeps the tier away (``available()`` False,
    calls answered at once without reaching the daemon) for a wait that doubles from
    ``retry_after`` (0.1 s) up to ``max_retry_after`` (0.4 s): 0.1, 0.2, 0.4, 0.4, 0.4.
    Without the cap the last would be 1.6 s (over 0.4 s + 1 s of slack); without
    doubling the third 0.1 s."""
    d = start_daemon("--cpu-size", "16MiB")
    c0 = chunk(0, tag="backoff")
    tier = RemoteBackend(
        d.url, timeout=0.3, connect_timeout=0.3, retry_after=0.1, max_retry_after=0.4
    )
    try:
        assert tier.put([c0]) == [True]
        with _frozen(d):
            for want in (0.1, 0.2, 0.4, 0.4, 0.4):
                start = time.monotonic()
                assert tier.contains([c0.key]) == 0  # fails at its 0.3 s deadline
                failed = time.monotonic()
                found, elapsed = _timed(lambda: tier.contains([c0.key]))
                assert found == 0 and elapsed < 0.25 and not tier.available()
                wait_until(tier.available, 5, "the back-off to end")
                back = time.monotonic()
                # The back-off starts when the deadline fires, at least 0.3 s after start.
                assert back - start >= 0.3 + want - 0.05, (want, back - start)  # never early
                assert back - failed < want + 1.0, (want, back - failed)  # nor much later
        wait_until(tier.available, 5, "the back-off to end")
        assert tier.contains([c0.key]) == 1
    finally:
        tier.close()
        assert d.terminate() == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve", "--metrics-port", "x"], "--metrics-port"),
        (["serve", "--auth-token-file", "/nonexistent"], "--auth-token-file"),
        (["serve", "--cpu-size", "lots"], "cpu.size"),
        (["serve", "--max-batch", "0"], "max_batch"),
        (["stats", "--url", "http://x"], "expected kvstore://host:port"),
        (["bench", "--url", "kvstore://127.0.0.1:1", "--transports", "pigeon"], "--transports"),
    ],
)
def test_bad_cli_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_config_values_name_the_key():
    from store.config import ConfigError

    for flat, message in (
        ({"remote.url": "redis://x"}, "remote.url"),
        ({"remote.transport": "carrier"}, "remote.transport"),
        ({"remote.timeout": "0"}, "remote.timeout"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_flat(flat)
    assert same is not None
