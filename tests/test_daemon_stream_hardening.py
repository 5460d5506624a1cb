"""The stream port before (and just after) authentication: nothing a peer sends or holds
open costs the daemon more than a small, fixed amount, and the port outlives running out
of file descriptors (issue 13, item 3). Attacks on a real ``kvstore serve``."""

from __future__ import annotations

import socket
import sys
import time

import pytest
from daemon_probe import (
    PeakMemory,
    answers,
    closed_within,
    connect,
    frame,
    hello,
    output,
    stream_port,
)
from daemon_proc import DaemonProc, chunk, same, scrape, start_daemon

from benchmarks.harness import DAEMON_READY, Child
from store.client import KVStoreClient
from store.wire.stream import RemoteError, check_reply

TOKEN = "stream-hardening-token"
MiB = 1 << 20


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN)
    return str(path)


@pytest.fixture(scope="module")
def daemon(token_file):
    d = start_daemon("--cpu-size", "32MiB", "--auth-token-file", token_file)
    yield d
    output(d)
    assert d.terminate() == 0


def _works(d: DaemonProc, tag: str) -> bool:
    """A fresh client's stream put and get of one chunk return the right bytes."""
    c = chunk(1, size=8192, tag=tag)
    with KVStoreClient(d.url, TOKEN, timeout=10, transport="stream") as client:
        return client.put([c]) == [True] and same(client.get([c.key])[0], c)


def test_a_silent_or_dripping_peer_is_dropped_at_the_handshake_deadline(daemon):
    """One connection says nothing; another sends a valid hello one byte at a time, too
    slowly to finish before the deadline (5 s by default). The daemon hangs up on both
    then; it used to wait for them forever, a thread and a buffer each."""
    port = stream_port(daemon, TOKEN)
    silent, drip = connect(port), connect(port)
    raw = frame({"op": "hello", "token": TOKEN, "client": "drip"})
    start = time.monotonic()
    try:
        for i in range(len(raw) - 1):  # ~0.4 s a byte: the whole frame takes ~20 s
            if closed_within(drip, 0.4):
                break
            drip.sendall(raw[i : i + 1])
        else:
            pytest.fail("the daemon waited for the whole dripped hello")
        assert closed_within(silent, 15)
        assert time.monotonic() - start > 2  # the deadline, not a refusal at once
    finally:
        silent.close()
        drip.close()
    assert _works(daemon, "after-drip")
    turned_away = ("kvstore_daemon_stream_turned_away_total", (("reason", "handshake"),))
    assert scrape(daemon.metrics_port)[turned_away] >= 2  # operators see it happen


def test_a_huge_frame_before_hello_is_refused_without_reserving_its_size(daemon):
    """Frames that declare 8 MiB and send nothing more: the daemon used to zero-fill a
    buffer of the declared size for each and wait. Now each is refused at once, with a
    reason, and the daemon's peak memory barely moves."""
    port = stream_port(daemon, TOKEN)
    peak = PeakMemory(daemon.proc.pid)
    peak.start()
    conns = [connect(port) for _ in range(24)]
    try:
        for s in conns:
            s.sendall((8 * MiB).to_bytes(4, "little"))
        for s in conns:
            got = answers(s)
            assert [a.get("error") for a in got] == ["INVALID_ARGUMENT"]
            assert "before hello" in got[0]["message"]
    finally:
        for s in conns:
            s.close()
    assert peak.grown() < 48 * MiB  # was +192 MiB
    assert _works(daemon, "after-huge")


def _maps_frame(nbytes: int) -> bytes:
    """A get frame of about ``nbytes`` whose keys are lists of empty maps: one byte each
    on the wire, ~70 bytes each as Python objects."""
    row = b"\xdc\xff\xff" + b"\x80" * 0xFFFF  # a list of 65535 empty maps
    rows = nbytes // len(row)
    body = b"\x82" + b"\xa2op\xa3get" + b"\xa4keys" + b"\xdc" + rows.to_bytes(2, "big") + row * rows
    return len(body).to_bytes(4, "little") + body


def test_a_frame_of_empty_maps_is_refused_before_it_is_built(daemon):
    """A 4 MiB frame of empty maps used to decode to ~300 MB of dicts, before hello and
    after. Before hello such a frame is far over the small pre-hello limit; after hello
    the decoder stops at a bounded count of lists and maps."""
    port = stream_port(daemon, TOKEN)
    peak = PeakMemory(daemon.proc.pid)
    peak.start()
    with connect(port) as s:
        assert check_reply(hello(s, TOKEN))["ok"]
        s.sendall(_maps_frame(4 * MiB))
        got = answers(s)
    assert [a.get("error") for a in got] == ["INVALID_ARGUMENT"]
    assert peak.grown() < 48 * MiB
    peak.start()
    with connect(port) as s:  # before hello: refused on its length alone
        try:
            s.sendall(_maps_frame(4 * MiB))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon hung up before reading it all: what it should do
        assert closed_within(s, 10)
    assert peak.grown() < 48 * MiB
    assert _works(daemon, "after-maps")


def test_connections_past_the_cap_are_refused_and_served_again_once_one_closes(token_file):
    d = start_daemon(
        "--cpu-size",
        "32MiB",
        "--auth-token-file",
        token_file,
        "--max-connections",
        "4",
        "--handshake-timeout",
        "60",
    )
    try:
        port = stream_port(d, TOKEN)
        idle = [connect(port) for _ in range(4)]  # at the cap, before hello
        with connect(port) as s:
            got = answers(s)
        assert [a.get("error") for a in got] == ["RESOURCE_EXHAUSTED"]
        assert "4 connections" in got[0]["message"]
        turned_away = ("kvstore_daemon_stream_turned_away_total", (("reason", "cap"),))
        assert scrape(d.metrics_port)[turned_away] == 1
        with KVStoreClient(d.url, TOKEN, timeout=10, transport="stream") as client:
            assert client.lookup([]) == []  # gRPC is not capped
            with pytest.raises(RemoteError) as exc:
                client.put([chunk(2, tag="capped")])
            assert exc.value.code == "RESOURCE_EXHAUSTED"
        idle.pop().close()
        deadline = time.monotonic() + 15
        while True:  # the daemon notices the closed connection soon after
            try:
                assert _works(d, "under-cap")
                break
            except RemoteError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        for s in idle:
            s.close()
    finally:
        output(d)
        assert d.terminate() == 0


def test_the_stream_port_outlives_running_out_of_file_descriptors(token_file):
    """Under ``ulimit -n 48`` (the daemon needs ~15), connections until ``accept`` fails
    with EMFILE. The accept thread used to exit there: the port stayed dead for good.
    Now it logs once, backs off, and serves again once descriptors are free."""
    argv = [
        "bash",
        "-c",
        'ulimit -n 48 && exec "$@"',
        "kvstore",
        sys.executable,
        "-m",
        "store.cli",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--cpu-size",
        "32MiB",
        "--auth-token-file",
        token_file,
        "--handshake-timeout",
        "60",
    ]
    proc = Child(argv)
    m = proc.wait_for_line(DAEMON_READY, 60, "kvstore serve")
    d = DaemonProc(proc, int(m.group(2)), int(m.group(4)))
    conns: list[socket.socket] = []
    try:
        port = stream_port(d, TOKEN)
        conns = [connect(port) for _ in range(60)]  # more than the daemon has descriptors
        seen, deadline = "", time.monotonic() + 20
        while "file descriptors" not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
            seen += output(d)
        assert "file descriptors" in seen, seen[-2000:]
        for s in conns:
            s.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert _works(d, "after-emfile")
                break
            except (RemoteError, OSError):
                assert time.monotonic() < deadline, "the stream port stayed dead"
                time.sleep(0.2)
        with KVStoreClient(d.url, TOKEN, timeout=10) as client:
            assert client.health().status == "serving"
        logged = seen.count("file descriptors") + output(d).count("file descriptors")
        assert logged <= 3, "logged at every try, not once"
    finally:
        for s in conns:
            s.close()
        output(d)
        assert d.terminate() == 0


def test_health_is_not_serving_once_the_stream_port_is_dead():
    """The accept thread ends on an error it cannot wait out (here: the listening socket
    is shut down under it). Health then says so instead of ``serving``."""
    from store.config import StoreConfig
    from store.daemon.serve import Daemon, ServeOptions

    config = StoreConfig.load(overrides={"cpu.size": "16MiB"}, env={})
    daemon = Daemon(config, ServeOptions(port=0, metrics_port=None))
    try:
        url = f"kvstore://127.0.0.1:{daemon.port}"
        with KVStoreClient(url, timeout=10) as client:
            assert client.health().status == "serving"
            daemon.streams._listener.shutdown(socket.SHUT_RDWR)  # accept() fails: EINVAL
            deadline = time.monotonic() + 10
            while (status := client.health().status) == "serving":
                assert time.monotonic() < deadline, "Health still says serving"
                time.sleep(0.1)
            assert status == "not_serving"
    finally:
        daemon.stop()


def test_the_cap_and_deadline_are_checked_when_the_daemon_starts(token_file, capsys):
    from store.cli import main

    for flag, value, message in (
        ("--max-connections", "0", "max_connections"),
        ("--handshake-timeout", "0", "handshake_timeout"),
        ("--handshake-timeout", "nan", "handshake_timeout"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--port", "0", "--metrics-port", "off", flag, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
