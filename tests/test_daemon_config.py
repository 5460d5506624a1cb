"""``kvstore serve --config FILE`` and ``--redis-url``: the daemon as configured, checked
through its own Health and Stats; bad config files stop it at start with exit status 2."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from daemon_proc import chunk, same, start_daemon

from store.client import KVStoreClient

MiB = 1 << 20


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _capacities(c: KVStoreClient) -> dict[str, int]:
    return {t.tier: t.bytes_capacity for t in c.stats().tiers}


def test_the_config_file_sets_tiers_and_sizes_and_a_flag_overrides_it(tmp_path):
    config = _write(
        tmp_path / "kvstore.yaml",
        f"""\
tiers: [cpu, disk]
cpu:
  size: 24MiB
  page_size: 256KiB
disk:
  path: {tmp_path / "disk"}
  size: 40MiB
  fsync: false
""",
    )
    d = start_daemon("--config", config)
    try:
        with KVStoreClient(d.url, timeout=10) as c:
            assert list(c.health().tiers) == ["cpu", "disk"]
            assert _capacities(c) == {"cpu": 24 * MiB, "disk": 40 * MiB}
            x = chunk(1, size=64 << 10, tag="config")
            assert c.put([x]) == [True] and c.lookup([x.key]) == ["cpu"]
            assert {t.tier: t.items for t in c.stats().tiers} == {"cpu": 1, "disk": 1}
        files = [f for f in (tmp_path / "disk").rglob("*") if f.is_file()]
        assert files, "the disk tier writes under the file's disk.path"
    finally:
        assert d.terminate() == 0

    d = start_daemon("--config", config, "--cpu-size", "12MiB")
    try:
        with KVStoreClient(d.url, timeout=10) as c:
            assert list(c.health().tiers) == ["cpu", "disk"]
            assert _capacities(c) == {"cpu": 12 * MiB, "disk": 40 * MiB}  # the rest from the file
    finally:
        assert d.terminate() == 0


def _redis_keys(url: str, pattern: str) -> list[str]:
    """``KEYS pattern`` on the server at ``url``, over a plain socket (RESP)."""
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"*2\r\n$4\r\nKEYS\r\n${len(pattern)}\r\n{pattern}\r\n".encode())
        data = b""
        while True:
            data += s.recv(1 << 16)
            lines = data.split(b"\r\n")
            count = int(lines[0][1:])
            if len(lines) >= 2 * count + 2:  # header, then a length and a key per entry
                return [lines[2 + 2 * i].decode() for i in range(count)]


def test_redis_url_adds_the_tier_and_serves_what_the_cpu_tier_evicted(tmp_path, redis_factory):
    """A 1 MiB cpu tier in front of a private redis-server: 24 chunks of 64 KiB do not fit
    above, but every put is written through to redis, so all are still served."""
    _, url = redis_factory()
    d = start_daemon("--cpu-size", "1MiB", "--set", "cpu.page_size=64KiB", "--redis-url", url)
    chunks = [chunk(i, size=60 << 10, tag="redis") for i in range(24)]
    keys = [c.key for c in chunks]
    try:
        with KVStoreClient(d.url, timeout=10) as c:
            assert list(c.health().tiers) == ["cpu", "redis"]
            assert c.put(chunks) == [True] * 24
            assert sorted(_redis_keys(url, "kvstore:*")) == sorted(f"kvstore:{k}" for k in keys)
            where = [c.lookup([k])[0] for k in keys]
            assert set(where) == {"cpu", "redis"}, where  # some evicted above, none lost
            in_redis = [x for x, w in zip(chunks, where, strict=True) if w == "redis"]
            got = c.get([x.key for x in in_redis], transport="stream")
            assert all(same(g, w) for g, w in zip(got, in_redis, strict=True))
            stats = {t.tier: t for t in c.stats().tiers}
            assert stats["redis"].hits >= len(in_redis) and stats["cpu"].evictions > 0
    finally:
        assert d.terminate() == 0


def test_a_redis_only_daemon_keeps_chunks_in_redis(tmp_path, redis_factory):
    _, url = redis_factory()
    config = _write(tmp_path / "kvstore.yaml", "tiers: [redis]\nredis: {namespace: 'kv-test:'}\n")
    d = start_daemon("--config", config, "--redis-url", url)
    x = chunk(7, size=100 << 10, tag="redis-only")
    try:
        with KVStoreClient(d.url, timeout=10) as c:
            assert list(c.health().tiers) == ["redis"]
            for transport in ("stream", "grpc", "auto"):
                assert c.put([x], transport=transport) == [True]
                assert c.lookup([x.key]) == ["redis"]
                assert same(c.get([x.key], transport=transport)[0], x)
            assert _redis_keys(url, "kv-test:*") == [f"kv-test:{x.key}"]
    finally:
        assert d.terminate() == 0


def _serve(*args: str) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "store.cli",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "off",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize(
    "text,message",
    [
        ("cpu:\n  sise: 1GiB\n", "cpu.sise: unknown key"),
        ("cpu: {size: lots}\n", "cpu.size"),
        ("- cpu\n- disk\n", "top level must be a mapping"),
        ("tiers: [cpu\ncpu: {size: 1GiB\n", "not valid YAML (line"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, text, message):
    config = _write(tmp_path / "bad.yaml", text)
    done = _serve("--config", config)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("kvstore: error: ") and message in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "kvstore serve: grpc" not in done.stdout  # it never started serving


def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path):
    done = _serve("--config", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    assert "nope.yaml" in done.stderr and done.stderr.count("\n") == 1, done.stderr
