"""Every RPC of a real ``kvstore serve`` process, through the client, the remote backend and
a TieredStore with a remote tier; bad input and limits; metrics."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from daemon_proc import FP, chunk, daemon_client, key, same, scrape, start_daemon

from backends.base import create_backend
from kvcore.chunk import ChunkHeader, encode_prefix, make_chunk
from kvcore.keys import chunk_key
from store.cli import main
from store.client import KVStoreClient
from store.config import from_flat
from store.tiered import TieredStore
from store.wire.proto import kvstore_pb2 as pb
from store.wire.stream import RemoteError

TRANSPORTS = ["stream", "shm", "grpc"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    disk = tmp_path_factory.mktemp("daemon-disk")
    d = start_daemon(
        "--cpu-size",
        "64MiB",
        "--disk-path",
        str(disk),
        "--disk-size",
        "256MiB",
        "--max-batch",
        "64",
        "--max-chunk-size",
        "1MiB",
        "--set",
        "disk.fsync=false",
    )
    yield d
    assert d.terminate() == 0


@pytest.fixture
def client(daemon):
    with KVStoreClient(daemon.url, timeout=10) as c:
        yield c


def test_health_names_tiers_and_limits(client):
    h = client.health()
    assert (h.status, list(h.tiers), h.max_batch, h.max_chunk_bytes) == (
        "serving",
        ["cpu", "disk"],
        64,
        1 << 20,
    )
    assert h.stream_port > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_put_lookup_get_delete(client, transport):
    chunks = [chunk(i, tag=transport) for i in range(5)]
    keys = [c.key for c in chunks]
    assert client.put(chunks[:3], transport=transport) == [True] * 3
    assert client.lookup(keys) == ["cpu"] * 3
    got = client.get(keys, transport=transport)
    assert [same(g, c) for g, c in zip(got, chunks, strict=True)] == [True] * 3 + [False] * 2
    outs = [np.full(4096 + 8, 9, np.uint8) for _ in keys]
    got = client.get(keys[::-1], outs, transport=transport)
    assert got[:2] == [None, None] and same(got[4], chunks[0])
    assert np.shares_memory(np.asarray(got[4].payload), outs[4]) and (outs[4][4096:] == 9).all()
    assert client.delete(keys[:2]) == 4  # cpu and disk copies
    assert client.lookup(keys) == []


def test_get_larger_than_the_shared_memory_region(daemon):
    with KVStoreClient(daemon.url, transport="shm", region_bytes=1 << 20) as c:
        chunks = [chunk(i, size=300_000, tag="big") for i in range(8)]  # 2.4 MB > 1 MiB
        assert c.put(chunks) == [True] * 8
        got = c.get([x.key for x in chunks])
        assert all(same(g, x) for g, x in zip(got, chunks, strict=True))


def test_fingerprint_filters_gets(client):
    c = chunk(1, tag="fp")
    client.put([c], fingerprint=FP)
    assert client.get([c.key], fingerprint=b"\x08" * 32) == [None]
    assert same(client.get([c.key], fingerprint=FP)[0], c)


def test_remote_backend_is_a_tier(daemon):
    b = create_backend("remote", url=daemon.url)
    try:
        chunks = [chunk(i, tag="backend") for i in range(4)]
        assert b.put(chunks) == [True] * 4
        assert b.contains([c.key for c in chunks] + [key(99)]) == 4
        assert all(same(g, c) for g, c in zip(b.get([c.key for c in chunks]), chunks, strict=True))
        usage = b.usage()
        assert usage.items >= 8 and usage.bytes_capacity == (64 << 20) + (256 << 20)
        assert b.delete([chunks[0].key]) == 2
    finally:
        b.close()


def test_tiered_store_shares_through_the_remote_tier(daemon):
    config = from_flat({"tiers": f"cpu,{daemon.url}", "cpu.size": "4MiB", "workers": 1})
    assert config.tiers == ["cpu", "remote"] and config.remote.url == daemon.url
    kv = np.arange(2 * 2 * 16 * 2 * 8, dtype=np.float32).reshape(2, 2, 16, 2, 8)
    keys = [key(i, "tiered") for i in range(3)]
    with TieredStore(config, FP) as a:
        assert a.put([a.make_chunk(k, kv + i, 16) for i, k in enumerate(keys)]) == 3
    with TieredStore(config, FP) as b:  # another engine: its cpu tier is empty
        assert b.locate(keys) == ["remote"] * 3
        outs = [np.empty_like(kv) for _ in keys]
        got = b.get(keys, outs)
        assert all(g is not None for g in got)
        assert all(np.array_equal(o, kv + i) for i, o in enumerate(outs))
        assert b.locate(keys) == ["cpu"] * 3  # promoted


# -- bad input ------------------------------------------------------------------------
def _tampered(c, **changes):
    fields = {f: getattr(c.header, f) for f in ChunkHeader.__slots__}
    return c._replace(header=ChunkHeader(**(fields | changes)))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_puts_are_refused_and_store_nothing(client, transport):
    good, fresh = chunk(1, tag="keep" + transport), chunk(2, tag="new" + transport)
    client.put([good], transport=transport)
    bad = {
        "checksum": _tampered(chunk(3), checksum=1),
        "oversized": make_chunk(
            key(4), FP, np.zeros((1, 2, 1, 1, (1 << 20) // 2 + 1), np.uint8), 1
        ),
        "malformed key": _tampered(chunk(5), key="../../etc/passwd"),
        "short payload": _tampered(chunk(6), nbytes=4097),
    }
    for what, c in bad.items():
        with pytest.raises(RemoteError) as exc:
            client.put([fresh, c], transport=transport)
        assert exc.value.code == "INVALID_ARGUMENT", what
    with pytest.raises(RemoteError, match="fingerprint"):
        client.put([chunk(7)], fingerprint=b"\x01" * 32, transport=transport)
    assert client.lookup([fresh.key]) == []
    assert same(client.get([good.key], transport=transport)[0], good)  # still intact


@pytest.mark.parametrize("transport", ["stream", "shm"])
def test_a_bad_checksum_late_in_a_large_put_leaves_none_of_it_stored(client, transport):
    # The stream path verifies and stores a put group by group while the next group
    # arrives; a bad payload in a later group must undo the groups stored before it.
    size = (1 << 20) - 4096
    chunks = [chunk(i, size=size, tag="late" + transport) for i in range(6)]  # > 4 MiB
    bad = chunks[:5] + [_tampered(chunks[5], checksum=chunks[5].header.checksum ^ 1)]
    with pytest.raises(RemoteError, match="checksum") as exc:
        client.put(bad, transport=transport)
    assert exc.value.code == "INVALID_ARGUMENT"
    assert client.lookup([c.key for c in chunks]) == []
    assert client.put(chunks, transport=transport) == [True] * 6
    outs = [np.empty(size, np.uint8) for _ in chunks]
    got = client.get([c.key for c in chunks], outs, transport=transport)  # several parts
    assert all(same(g, c) for g, c in zip(got, chunks, strict=True))
    assert all(np.shares_memory(np.asarray(g.payload), o) for g, o in zip(got, outs, strict=True))
    client.delete([c.key for c in chunks])


@pytest.fixture(scope="module")
def cpu_only():
    """A daemon with one cpu tier: stream puts land straight in its pages (reserve)."""
    with daemon_client("--cpu-size", "32MiB", "--max-batch", "64", "--max-chunk-size", "2MiB") as c:
        yield c


def test_puts_received_into_reserved_pages_round_trip_and_refuse_as_a_whole(cpu_only):
    c = cpu_only
    size = (1 << 20) - 4096
    chunks = [chunk(i, size=size, tag="reserve") for i in range(6)]  # several put groups
    keys = [x.key for x in chunks]
    assert c.put(chunks[:2], transport="stream") == [True, True]
    # Already stored chunks, new ones, then a bad payload in the second group: refused,
    # the new ones undone, and what was stored before the request kept.
    bad = chunks[:5] + [_tampered(chunks[5], checksum=chunks[5].header.checksum ^ 1)]
    with pytest.raises(RemoteError, match="checksum"):
        c.put(bad, transport="stream")
    assert c.lookup(keys) == ["cpu", "cpu"]
    # A bad payload in the middle: the groups after it are read and dropped, not stored.
    middle = chunks[:3] + [_tampered(chunks[3], checksum=chunks[3].header.checksum ^ 1)]
    with pytest.raises(RemoteError, match="checksum"):
        c.put(middle + chunks[4:], transport="stream")
    assert c.lookup(keys) == ["cpu", "cpu"]
    assert c.get([keys[4], keys[5]], transport="stream") == [None, None]
    # A bad header late in the request: all headers are checked before any payload is
    # stored, so it is refused alike, and the stream stays in step for the next request.
    for late in (_tampered(chunks[5], key="../x"), _tampered(chunks[5], fingerprint=b"\1" * 32)):
        with pytest.raises(RemoteError) as exc:
            c.put(chunks[:5] + [late], fingerprint=FP, transport="stream")
        assert exc.value.code == "INVALID_ARGUMENT"
        assert c.lookup(keys) == ["cpu", "cpu"]
    assert c.put(chunks, transport="stream") == [True] * 6
    outs = [np.empty(size, np.uint8) for _ in chunks]
    got = c.get(keys, outs, transport="stream")
    assert all(same(g, x) for g, x in zip(got, chunks, strict=True))
    assert c.stats().tiers[0].items == 6
    c.delete(keys)
    tier = c.stats().tiers[0]
    assert tier.items == 0 and tier.bytes_used == 0  # no reserved page was left behind


def test_a_key_must_match_its_fingerprint_and_block_hash(client):
    block = b"\x05" * 32
    right = chunk_key(FP, block)
    c = make_chunk(right, FP, np.zeros((1, 2, 4, 1, 1), np.uint8), 4, dtype="uint8")
    ok = pb.Chunk(header=encode_prefix(c.header), payload=bytes(c.payload), block_hash=block)
    assert list(client._call("Put", iter([pb.PutRequest(chunks=[ok])])).stored) == [True]
    other = make_chunk(chunk_key(b"\x09" * 32, block), FP, np.zeros((1, 2, 4, 1, 1), np.uint8), 4)
    bad = pb.Chunk(
        header=encode_prefix(other.header), payload=bytes(other.payload), block_hash=block
    )
    with pytest.raises(RemoteError, match="key does not match") as exc:
        client._call("Put", iter([pb.PutRequest(chunks=[bad])]))
    assert exc.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_malformed_keys_and_batches_over_the_limit(client, transport):
    bad = (
        ["not-hex"],
        ["A" * 64],
        [key(i) for i in range(65)],
        [""],
        [key(1) + "\n"],
        [key(1)[:63], key(2) + "0"],
        [key(1) + "," + key(2)],
        ["0" * 16 + "." + key(1) + "," + key(2)],
    )
    for keys in bad:
        with pytest.raises(RemoteError) as exc:
            client.get(keys, transport=transport)
        assert exc.value.code == "INVALID_ARGUMENT"
    for call in (client.lookup, client.delete):
        for keys in (["../x"], [key(1) + "," + key(2)]):  # a comma: not two keys in one
            with pytest.raises(RemoteError, match="malformed key"):
                call(keys)
    assert client.get([key(1, "after")], transport=transport) == [None]  # connection still fine


# -- operations -----------------------------------------------------------------------
def test_metrics_and_stats_table(daemon, client, capsys):
    c = chunk(1, tag="metrics")
    name = client._name
    before = scrape(daemon.metrics_port)
    client.put([c], transport="stream")
    client.get([c.key, key(2, "metrics")], transport="stream")
    after = scrape(daemon.metrics_port)

    def grew(metric, **labels):
        k = (metric, tuple(sorted(labels.items())))
        return after.get(k, 0) - before.get(k, 0)

    assert grew("kvstore_tier_hits_total", tier="cpu") == 1
    assert grew("kvstore_tier_misses_total", tier="disk") == 1  # the second key, in no tier
    assert grew("kvstore_tier_written_bytes_total", tier="cpu") == 4096
    assert grew("kvstore_tier_read_bytes_total", tier="cpu") == 4096
    assert grew("kvstore_tier_items", tier="cpu") == 1  # occupancy, read at scrape time
    assert grew("kvstore_tier_used_bytes", tier="cpu") == 64 << 10  # one page of the pool
    assert after[("kvstore_tier_capacity_bytes", (("tier", "disk"),))] == 256 << 20
    for metric in ("kvstore_tier_evictions_total", "kvstore_tier_checksum_failures_total"):
        assert (metric, (("tier", "cpu"),)) in after, metric
    assert grew("kvstore_tier_op_seconds_count", op="get", tier="cpu") >= 1
    for method in ("Put", "Get"):  # per client, method and transport
        assert (
            grew("kvstore_daemon_requests_total", client=name, method=method, transport="stream")
            == 1
        )
    assert grew("kvstore_daemon_payload_bytes_total", direction="in", transport="stream") == 4096
    assert grew("kvstore_daemon_payload_bytes_total", direction="out", transport="stream") == 4096
    # The reply leaves inside the request's span, so the gauge may trail it by a moment.
    in_flight = after[("kvstore_daemon_in_flight", ())]
    for _ in range(100):
        if in_flight == 0:
            break
        time.sleep(0.02)
        in_flight = scrape(daemon.metrics_port)[("kvstore_daemon_in_flight", ())]
    assert in_flight == 0
    with pytest.raises(RemoteError):
        client.put([_tampered(chunk(3, tag="metrics"), checksum=1)], transport="stream")
    errors = scrape(daemon.metrics_port)
    key_ = (
        "kvstore_daemon_request_errors_total",
        (("code", "INVALID_ARGUMENT"), ("method", "Put")),
    )
    assert errors.get(key_, 0) - after.get(key_, 0) == 1
    assert main(["stats", "--url", daemon.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["tier", "items", "used"]
    assert [line.split()[0] for line in out[2:]] == ["cpu", "disk"]


def test_stats_of_a_dead_daemon_fails_quickly(capsys):
    assert main(["stats", "--url", "kvstore://127.0.0.1:9"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_bench_against_the_daemon_writes_json(daemon, tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--url",
                daemon.url,
                "--sizes",
                "64KiB",
                "--total",
                "512KiB",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    import json

    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["gbps"]) >= {"raw_put", "raw_get", "memcpy", "stream_get", "shm_get", "grpc_put"}
    assert all(v > 0 for v in row["gbps"].values())


def test_bench_refuses_a_missing_lmcache_venv(daemon, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--url", daemon.url, "--lmcache-venv", str(tmp_path / "none")])
    assert exc.value.code != 0 and "bin/python" in capsys.readouterr().err


LMCACHE_VENV = os.environ.get("KVSTORE_LMCACHE_VENV", ".venv-lmcache")


@pytest.mark.skipif(
    not os.path.exists(os.path.join(LMCACHE_VENV, "bin", "lmcache_server")),
    reason="LMCache's virtual environment is not installed (pip install lmcache in .venv-lmcache)",
)
def test_bench_compares_with_lmcache_server(daemon, tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--url",
                daemon.url,
                "--sizes",
                "64KiB",
                "--total",
                "512KiB",
                "--transports",
                "stream",
                "--repeats",
                "1",
                "--lmcache-venv",
                LMCACHE_VENV,
                "--json",
                str(out),
            ]
        )
        == 0
    )
    import json

    (row,) = json.loads(out.read_text())["rows"]
    assert row["gbps"]["lmcache_put"] > 0 and row["gbps"]["lmcache_get"] > 0
    assert set(row["vs_lmcache"]) == {"stream_put", "stream_get"}
