"""Disaggregated prefill/decode between real ``engine serve`` processes and a real
``kvstore serve`` daemon, without the router: the two legs by hand, as vLLM's proxy
sends them; the prefill node killed -9 after its leg changes nothing for the decode."""

from __future__ import annotations

import time

from daemon_proc import start_daemon
from engine_server_proc import start_engine

from backends.remote import RemoteBackend

PROMPT = "the quick brown fox jumps " * 25  # two whole 256-token store chunks


def test_prefill_leg_then_decode_leg_after_the_producer_died():
    daemon = start_daemon("--cpu-size", "64MiB")
    procs = []
    try:
        procs = [
            start_engine("--model", "tiny"),
            start_engine("--model", "tiny", "--kvstore", daemon.url, "--kv-role", "producer"),
            start_engine("--model", "tiny", "--kvstore", daemon.url, "--kv-role", "consumer"),
        ]
        plain, producer, consumer = procs
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        status, want = plain.post("/v1/completions", body)
        assert status == 200
        leg = {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        for _ in range(3):  # a remote tier that timed out under load backs off ~1 s
            status, pre = producer.post("/v1/completions", leg)
            assert status == 200, pre
            params = pre["kv_transfer_params"]
            if params["num_tokens"]:
                break
            time.sleep(1.5)
        assert params["do_remote_prefill"] and params["num_tokens"] == 512 and params["lease_id"]
        assert params["remote_store"] == daemon.url
        producer.proc.kill()  # the KV lives in the daemon, under the lease
        producer.proc.wait(10)
        status, got = consumer.post("/v1/completions", {**body, "kv_transfer_params": params})
        assert status == 200, got
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["kv"]["sources"].get("remote", 0) == 512
        status, bad = consumer.post(
            "/v1/completions", {**body, "kv_transfer_params": {"lease_ttl": -1}}
        )
        assert status == 400 and bad["error"]["param"] == "kv_transfer_params"
        remote = RemoteBackend(daemon.url)
        deadline = time.monotonic() + 10
        while remote.active_leases() != 0:
            assert time.monotonic() < deadline, "the consumer did not release the lease"
            time.sleep(0.1)
        remote.close()
    finally:
        for p in procs:
            p.stop()
        daemon.terminate()
