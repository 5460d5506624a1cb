"""The UCX transport (store/wire/ucx_transport.py) against real ``kvstore serve --ucx`` processes,
over whatever UCX finds here (TCP, shared memory on one host; RDMA where there is some).

Skipped, naming the package, where ucxx is not installed (``pip install 'kvstore[ucx]'``);
the tests of what happens without it run everywhere."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
from daemon_proc import FP, chunk, key, same, start_daemon

from backends.remote import RemoteBackend
from kvcore.chunk import ChunkHeader
from store.client import KVStoreClient
from store.config import from_flat
from store.tiered import TieredStore
from store.wire import ucx_transport
from store.wire.stream import RemoteError

MISSING = "ucxx is not installed (pip install 'kvstore[ucx]', the ucxx-cu12 package)"


@pytest.fixture(scope="module")
def ucxx():
    return pytest.importorskip("ucxx", reason=MISSING)


@pytest.fixture(scope="module")
def daemon(ucxx):
    d = start_daemon(
        "--cpu-size", "64MiB", "--max-batch", "64", "--max-chunk-size", "1MiB", "--ucx"
    )
    yield d
    assert d.terminate() == 0


@pytest.fixture
def client(daemon):
    with KVStoreClient(daemon.url, timeout=10) as c:
        yield c


def _tampered(c, **changes):
    fields = {f: getattr(c.header, f) for f in ChunkHeader.__slots__}
    return c._replace(header=ChunkHeader(**(fields | changes)))


# -- without ucxx -----------------------------------------------------------------------
def test_without_ucxx_the_error_names_the_package(monkeypatch, capsys):
    monkeypatch.setattr(ucx_transport, "_lib", None)
    monkeypatch.setitem(sys.modules, "ucxx", None)  # import ucxx raises ImportError
    with pytest.raises(ucx_transport.UcxUnavailable, match=r"pip install 'kvstore\[ucx\]'"):
        KVStoreClient("kvstore://127.0.0.1:9", transport="ucx")
    with pytest.raises(ValueError, match="not one of"):
        KVStoreClient("kvstore://127.0.0.1:9", transport="rdma")
    from store.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "0", "--metrics-port", "off", "--ucx"])
    assert exc.value.code != 0
    assert "--ucx" in capsys.readouterr().err


# -- the round trip -----------------------------------------------------------------------
def test_put_lookup_get_delete(client):
    chunks = [chunk(i, tag="ucx") for i in range(5)]
    keys = [c.key for c in chunks]
    assert client.put(chunks[:3], transport="ucx") == [True] * 3
    assert client.lookup(keys) == ["cpu"] * 3
    got = client.get(keys, transport="ucx")
    assert [same(g, c) for g, c in zip(got, chunks, strict=True)] == [True] * 3 + [False] * 2
    outs = [np.full(4096 + 8, 9, np.uint8) for _ in keys]
    got = client.get(keys[::-1], outs, transport="ucx")
    assert got[:2] == [None, None] and same(got[4], chunks[0])
    # the payload went straight into the caller's buffer, and nothing past it
    assert np.shares_memory(np.asarray(got[4].payload), outs[4]) and (outs[4][4096:] == 9).all()
    assert client.delete(keys[:3]) == 3
    assert client.get(keys[:1], transport="ucx") == [None]


def test_large_batches_in_several_parts_land_in_the_callers_buffers(client):
    size = (1 << 20) - 4096
    chunks = [chunk(i, size=size, tag="ucx-big") for i in range(12)]  # > 4 MiB parts, 2 puts
    assert client.put(chunks, transport="ucx") == [True] * 12
    outs = [np.empty(size, np.uint8) for _ in chunks]
    got = client.get([c.key for c in chunks], outs, transport="ucx")
    assert all(same(g, c) for g, c in zip(got, chunks, strict=True))
    assert all(np.shares_memory(np.asarray(g.payload), o) for g, o in zip(got, outs, strict=True))
    client.delete([c.key for c in chunks])


def test_both_wires_share_one_store(client):
    a, b = chunk(1, tag="wire-a"), chunk(2, tag="wire-b")
    assert client.put([a], transport="ucx") == [True]
    assert client.put([b], transport="stream") == [True]
    assert same(client.get([a.key], transport="stream")[0], a)
    assert same(client.get([b.key], transport="ucx")[0], b)
    assert same(client.get([a.key], transport="shm")[0], a)


@pytest.mark.parametrize("transport", ["stream", "ucx"])
def test_fingerprints_and_checksums_as_on_the_stream(client, transport):
    c = chunk(1, tag="fp" + transport)
    assert client.put([c], fingerprint=FP, transport=transport) == [True]
    assert client.get([c.key], fingerprint=b"\x08" * 32, transport=transport) == [None]
    assert same(client.get([c.key], fingerprint=FP, transport=transport)[0], c)
    with pytest.raises(RemoteError, match="fingerprint") as exc:
        client.put([chunk(7, tag=transport)], fingerprint=b"\x01" * 32, transport=transport)
    assert exc.value.code == "INVALID_ARGUMENT"
    fresh = chunk(2, tag="fresh" + transport)
    for bad in (
        _tampered(chunk(3, tag=transport), checksum=1),
        _tampered(chunk(4, tag=transport), nbytes=4097),
        _tampered(chunk(5, tag=transport), key="../../etc/passwd"),
    ):
        with pytest.raises(RemoteError) as exc:
            client.put([fresh, bad], transport=transport)
        assert exc.value.code == "INVALID_ARGUMENT"
    assert client.lookup([fresh.key]) == []  # nothing of a refused request is stored
    assert client.get([key(1, "after")], transport=transport) == [None]  # connection usable


def test_a_bad_checksum_late_in_a_large_put_leaves_none_of_it_stored(client):
    size = (1 << 20) - 4096
    chunks = [chunk(i, size=size, tag="late-ucx") for i in range(6)]  # > one 4 MiB group
    bad = chunks[:5] + [_tampered(chunks[5], checksum=chunks[5].header.checksum ^ 1)]
    with pytest.raises(RemoteError, match="checksum") as exc:
        client.put(bad, transport="ucx")
    assert exc.value.code == "INVALID_ARGUMENT"
    assert client.lookup([c.key for c in chunks]) == []
    assert client.put(chunks, transport="ucx") == [True] * 6
    client.delete([c.key for c in chunks])


def test_concurrent_callers_each_get_their_own_connection(daemon):
    with KVStoreClient(daemon.url, timeout=10, transport="ucx") as c:
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                mine = [chunk(i, size=65536, tag=f"thread{t}") for i in range(8)]
                for _ in range(3):
                    assert c.put(mine) == [True] * 8
                    got = c.get([x.key for x in mine])
                    assert all(same(g, x) for g, x in zip(got, mine, strict=True))
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert all(conn.ucx for conn in c._idle) and len(c._idle) <= 3


def test_the_remote_tier_and_a_tiered_store_over_ucx(daemon):
    b = RemoteBackend(daemon.url, transport="ucx")
    try:
        chunks = [chunk(i, tag="ucx-backend") for i in range(4)]
        assert b.put(chunks) == [True] * 4
        assert b.contains([c.key for c in chunks] + [key(99)]) == 4
        assert all(same(g, c) for g, c in zip(b.get([c.key for c in chunks]), chunks, strict=True))
    finally:
        b.close()
    config = from_flat(
        {"tiers": f"cpu,{daemon.url}", "cpu.size": "4MiB", "workers": 1, "remote.transport": "ucx"}
    )
    assert config.remote.transport == "ucx"
    kv = np.arange(2 * 2 * 16 * 2 * 8, dtype=np.float32).reshape(2, 2, 16, 2, 8)
    keys = [key(i, "ucx-tiered") for i in range(3)]
    with TieredStore(config, FP) as a:
        assert a.put([a.make_chunk(k, kv + i, 16) for i, k in enumerate(keys)]) == 3
    with TieredStore(config, FP) as other:  # another engine: its cpu tier is empty
        outs = [np.empty_like(kv) for _ in keys]
        assert all(g is not None for g in other.get(keys, outs))
        assert all(np.array_equal(o, kv + i) for i, o in enumerate(outs))


# -- refusals and failures ------------------------------------------------------------------
def test_a_daemon_without_ucx_refuses_and_the_tier_misses(ucxx):
    d = start_daemon("--cpu-size", "16MiB")
    try:
        with KVStoreClient(d.url, transport="ucx") as c:
            with pytest.raises(RemoteError, match="--ucx") as exc:
                c.get([key(1)])
            assert exc.value.code == "FAILED_PRECONDITION"
            assert c.put([chunk(1, tag="noucx")], transport="stream") == [True]  # still serves
        b = RemoteBackend(d.url, transport="ucx")
        try:
            assert b.get([key(1)]) == [None] and b.put([chunk(2, tag="noucx")]) == [False]
        finally:
            b.close()
    finally:
        assert d.terminate() == 0


def test_the_token_is_checked_before_ucx(ucxx, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = start_daemon("--auth-token-file", str(token), "--cpu-size", "16MiB", "--ucx")
    try:
        with KVStoreClient(d.url, token="nope", transport="ucx") as anon:
            with pytest.raises(RemoteError) as exc:
                anon.get([key(1)])
            assert exc.value.code == "UNAUTHENTICATED"
        with KVStoreClient(d.url, token="s3cret", transport="ucx") as ok:
            c = chunk(1, tag="ucx-auth")
            assert ok.put([c]) == [True] and same(ok.get([c.key])[0], c)
    finally:
        assert d.terminate() == 0


def test_kill_9_mid_call_means_misses_within_the_deadline(ucxx):
    d = start_daemon("--cpu-size", "256MiB", "--ucx")
    b = RemoteBackend(d.url, transport="ucx", timeout=3.0, retry_after=30.0)
    try:
        size = (1 << 20) - 4096
        chunks = [chunk(i, size=size, tag="ucx-kill") for i in range(48)]
        keys = [c.key for c in chunks]
        assert b.put(chunks) == [True] * 48
        results: list = []
        finished = threading.Event()

        def reader() -> None:  # gets until the daemon dies under one of them
            outs = [np.empty(size, np.uint8) for _ in keys]
            while not finished.is_set():
                got = b.get(keys, outs)
                if got.count(None) == len(keys):
                    results.append(time.monotonic())
                    return

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.5)  # the reader is in the middle of 48 MiB gets
        d.kill()
        killed = time.monotonic()
        t.join(10)
        finished.set()
        assert not t.is_alive() and results, "a get hung past its deadline"
        assert results[0] - killed < 3.0 + 1.0  # misses within the deadline (plus slack)
        start = time.monotonic()
        assert b.get(keys[:2]) == [None, None] and b.put(chunks[:1]) == [False]  # backing off
        assert time.monotonic() - start < 0.5
    finally:
        b.close()
        d.kill()


def test_a_stopped_daemon_means_misses_at_the_deadline(ucxx):
    d = start_daemon("--cpu-size", "64MiB", "--ucx")
    b = RemoteBackend(d.url, transport="ucx", timeout=1.0)
    try:
        c = chunk(1, tag="ucx-stop")
        assert b.put([c]) == [True]
        assert same(b.get([c.key])[0], c)  # the connection is up and pooled
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert b.get([c.key]) == [None]
            assert 0.9 < time.monotonic() - start < 2.5
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
    finally:
        b.close()
        d.kill()


def test_sigterm_with_an_idle_ucx_connection_drains_and_exits_0(ucxx):
    d = start_daemon("--cpu-size", "16MiB", "--ucx")
    c = KVStoreClient(d.url, transport="ucx", timeout=2.0)
    try:
        assert c.put([chunk(1, tag="ucx-term")]) == [True]  # one idle UCX connection, pooled
        start = time.monotonic()
        assert d.terminate() == 0
        assert time.monotonic() - start < 10
        start = time.monotonic()
        with pytest.raises((OSError, RemoteError)):  # gone: an error, not a hang
            c.get([key(1)])
        assert time.monotonic() - start < 5
    finally:
        c.close()
        d.kill()


# -- prefill/decode over UCX --------------------------------------------------------------
def test_a_prefill_decode_hand_off_over_ucx_matches_one_engine(daemon):
    """Producer and consumer engines reach the daemon with ``remote.transport: ucx``: the
    decode leg loads the prefill leg's KV over UCX and answers as one engine does."""
    from engine import LLM, SamplingParams

    chunk_size = 32
    prompt = [(5 * i + 11) % 240 + 7 for i in range(4 * chunk_size + 5)]
    kv = {
        "kv_connector": "tiered",
        "kv_config": {"tiers": [daemon.url], "chunk_size": chunk_size, "remote.transport": "ucx"},
    }
    common = dict(kv_cache_memory="4MiB", max_num_seqs=2)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    with LLM("tiny", **common) as plain:
        want = plain.generate([prompt], greedy)[0].token_ids
    with LLM("tiny", kv_role="producer", **common, **kv) as pre:
        first = SamplingParams(temperature=0, max_tokens=1)
        handle = pre.generate([prompt], first, kv_transfer_params={"do_remote_decode": True})[0]
    params = handle.kv_transfer_params
    assert params["num_tokens"] == 4 * chunk_size and params["lease_id"]
    with LLM("tiny", kv_role="consumer", **common, **kv) as dec:
        out = dec.generate([prompt], greedy, kv_transfer_params=params)[0]
    assert out.token_ids == want
    assert out.metrics.kv_sources.get("remote", 0) == 4 * chunk_size
