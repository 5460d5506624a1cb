"""The daemon as a process: auth, kill -9 mid-use, restart with the disk tier, SIGTERM."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from daemon_proc import FP, chunk, same, start_daemon

from backends.remote import RemoteBackend
from store.cli import main
from store.client import KVStoreClient
from store.config import from_flat
from store.stream import RemoteError
from store.tiered import TieredStore


def test_a_token_is_required_when_configured(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = start_daemon("--auth-token-file", str(token), "--cpu-size", "16MiB")
    try:
        c = chunk(1, tag="auth")
        for wrong in (None, "nope"):
            with KVStoreClient(d.url, token=wrong) as anon:
                for call in (lambda: anon.lookup([c.key]), lambda: anon.put([c], transport="grpc"),
                             lambda: anon.put([c], transport="stream"), lambda: anon.stats()):  # fmt: skip
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
    config = from_flat({"tiers": ["cpu", d.url], "cpu.size": "1MiB", "cpu.page_size": "4KiB",
                        "remote.timeout": 2.0, "remote.retry_after": 0.2, "workers": 1})  # fmt: skip
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


def test_sigterm_drains_and_exits_cleanly(tmp_path):
    d = start_daemon("--cpu-size", "256MiB")
    chunks = [chunk(i, size=1 << 20, tag="drain") for i in range(48)]
    results: list = []

    def put() -> None:
        with KVStoreClient(d.url, transport="stream", timeout=20) as c:
            try:
                results.append(c.put(chunks))
            except RemoteError as exc:
                results.append(exc.code)

    t = threading.Thread(target=put)
    t.start()
    time.sleep(0.3)
    assert d.terminate() == 0
    t.join(30)
    assert not t.is_alive()
    assert results[0] == [True] * 48 or results[0] == "UNAVAILABLE"
    assert "kvstore serve: stopped" in d.proc.stdout.read()


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

    for flat, message in (({"remote.url": "redis://x"}, "remote.url"),
                          ({"remote.transport": "carrier"}, "remote.transport"),
                          ({"remote.timeout": "0"}, "remote.timeout")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            from_flat(flat)
    assert same is not None
