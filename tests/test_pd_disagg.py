"""Disaggregated prefill/decode in process: a producer and a consumer engine over one
real ``kvstore serve`` daemon, ``kv_transfer_params`` as vLLM shapes them, leases."""

from __future__ import annotations

import time

import pytest
from daemon_proc import PinCounts, start_daemon

from backends.remote import RemoteBackend
from benchmarks.harness import wait_until
from connector.disagg import check_params
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.server.protocol import ApiError, parse_completion
from store.daemon.lease import LeaseTable

CHUNK = 32
PROMPT = [(7 * i + 3) % 250 + 5 for i in range(5 * CHUNK + 3)]  # 5 whole chunks + 3


def run(engine: LLMEngine, prompt, max_tokens: int, kv=None):
    req = engine.add_request(
        prompt, SamplingParams(temperature=0, max_tokens=max_tokens), kv_transfer_params=kv
    )
    while True:
        for out in engine.step():
            if out.request_id == req.request_id and out.finished:
                return engine.finish_kv_transfer(out)


DEAD = "kvstore://127.0.0.1:9"  # nothing listens there


def engine(role: str, url: str | None) -> LLMEngine:
    store = {"tiers": [url], "chunk_size": CHUNK, "allowed_remote_stores": [DEAD]}
    kv = {} if url is None else {"kv_connector": "tiered", "kv_role": role, "kv_config": store}
    return LLMEngine(EngineConfig(model="tiny", kv_cache_memory="4MiB", max_num_seqs=4, **kv))


@pytest.fixture(scope="module")
def pd():
    daemon = start_daemon("--cpu-size", "32MiB")
    engines = [engine("none", None), engine("producer", daemon.url), engine("consumer", daemon.url)]
    remote = RemoteBackend(daemon.url)
    try:
        yield daemon, remote, *engines
    finally:
        remote.close()
        for e in engines:
            e.close()
        daemon.terminate()


def salted(tag: str) -> list[int]:
    """A prompt no other test stored: the engines' prefix caches and the daemon miss it."""
    return [hash(tag) % 200 + 5, *PROMPT[1:]]


def test_producer_hands_kv_to_consumer_with_the_answer_of_one_engine(pd):
    daemon, remote, plain, producer, consumer = pd
    prompt = salted("handoff")
    want = run(plain, prompt, 8).token_ids
    pre = run(producer, prompt, 1, {"do_remote_decode": True})
    params = pre.kv_transfer_params
    assert pre.token_ids == want[:1]
    assert params["do_remote_prefill"] and not params["do_remote_decode"]
    assert params["remote_store"] == daemon.url and params["num_tokens"] == 5 * CHUNK
    assert len(params["keys"]) == 5 and params["lease_id"]
    assert params["lease_expires"] > time.time()
    assert remote.active_leases() == 1
    out = run(consumer, prompt, 8, params)
    assert out.token_ids == want
    assert out.metrics.kv_sources.get("remote", 0) == 5 * CHUNK  # loaded, not recomputed
    wait_until(lambda: remote.active_leases() == 0)  # released when the consumer finished
    assert not consumer.requests and not producer.requests


def test_the_offline_api_runs_both_legs_and_finishes_the_hand_off(pd):
    """``LLM.generate(..., kv_transfer_params=...)``: a batch of prefill legs comes back
    with their handles (the hand-offs finish while other prompts still run), and a batch
    of decode legs loads them and answers as one engine would."""
    from engine import LLM

    daemon, remote, plain, *_ = pd
    prompts = [salted(f"offline-{i}") for i in range(3)]
    want = [run(plain, p, 6).token_ids for p in prompts]
    kv = {"kv_connector": "tiered", "kv_config": {"tiers": [daemon.url], "chunk_size": CHUNK}}
    common = dict(kv_cache_memory="4MiB", max_num_seqs=4, **kv)
    with (
        LLM("tiny", kv_role="producer", **common) as pre,
        LLM("tiny", kv_role="consumer", **common) as dec,
    ):
        first = SamplingParams(temperature=0, max_tokens=1)
        plain_one = SamplingParams(temperature=0, max_tokens=4)
        outs = pre.generate(
            [*prompts, PROMPT[:40]],
            [first, first, first, plain_one],
            kv_transfer_params=[{"do_remote_decode": True}] * 3 + [None],
        )
        handles = [o.kv_transfer_params for o in outs[:3]]
        assert outs[3].kv_transfer_params is None and len(outs[3].token_ids) == 4
        assert all(h["num_tokens"] == 5 * CHUNK and h["lease_id"] for h in handles)
        assert remote.active_leases() == 3
        got = dec.generate(
            prompts, SamplingParams(temperature=0, max_tokens=6), kv_transfer_params=handles
        )
        assert [o.token_ids for o in got] == want
        assert all(o.metrics.kv_sources.get("remote", 0) == 5 * CHUNK for o in got)
        wait_until(lambda: remote.active_leases() == 0)
        with pytest.raises(InvalidRequestError, match="kv_transfer_params"):
            dec.generate(prompts, kv_transfer_params=[None])


def test_expired_lease_and_evicted_kv_means_recompute(pd):
    daemon, remote, plain, producer, consumer = pd
    prompt = salted("expired")
    want = run(plain, prompt, 6).token_ids
    params = run(producer, prompt, 1, {"do_remote_decode": True, "lease_ttl": 0.2})
    params = params.kv_transfer_params
    assert params["num_tokens"] == 5 * CHUNK
    wait_until(lambda: remote.active_leases() == 0)  # the daemon's reaper ended it
    assert remote.delete(params["keys"]) == 5  # unpinned, so evictable: evict it
    out = run(consumer, prompt, 6, params)
    assert out.token_ids == want
    assert out.metrics.kv_sources.get("remote", 0) == 0
    assert remote.active_leases() == 0


def test_producer_that_never_saved_means_recompute(pd):
    """The prefill node died after answering (or the handle is stale): nothing to load,
    an unknown lease to release; the consumer recomputes the same answer."""
    daemon, remote, plain, producer, consumer = pd
    prompt = salted("gone")
    want = run(plain, prompt, 6).token_ids
    params = {
        "do_remote_prefill": True,
        "remote_store": daemon.url,
        "keys": ["ab" * 32],
        "num_tokens": 5 * CHUNK,
        "lease_id": "0123",
        "lease_expires": time.time() + 30,
    }
    out = run(consumer, prompt, 6, params)
    assert out.token_ids == want and out.metrics.kv_sources.get("remote", 0) == 0
    assert remote.active_leases() == 0


def test_dead_remote_store_gives_an_empty_handle_quickly(pd):
    daemon, remote, plain, producer, consumer = pd
    start = time.monotonic()
    pre = run(producer, salted("dead"), 1, {"do_remote_decode": True, "remote_store": DEAD})
    assert time.monotonic() - start < 8
    assert pre.kv_transfer_params["num_tokens"] == 0 and pre.kv_transfer_params["lease_id"] is None


def test_aborted_prefill_leg_leases_nothing(pd):
    daemon, remote, plain, producer, consumer = pd
    req = producer.add_request(
        salted("abort"), SamplingParams(max_tokens=1), kv_transfer_params={"do_remote_decode": True}
    )
    producer.abort_request(req.request_id)
    assert not producer.connector._req_puts and remote.active_leases() == 0


def test_kv_role_config_is_checked():
    with pytest.raises(
        InvalidRequestError, match="kv_role must be one of both, producer, consumer"
    ):
        EngineConfig(model="tiny", kv_connector="tiered", kv_role="prefill")
    with pytest.raises(InvalidRequestError, match="needs a KV connector"):
        EngineConfig(model="tiny", kv_role="producer")


def test_kv_transfer_params_are_checked():
    assert check_params({"do_remote_decode": True}) is None
    assert "remote_store" in check_params({"remote_store": "http://x"})
    assert "lease_ttl" in check_params({"lease_ttl": 0})
    body = {"model": "tiny", "prompt": "hi", "kv_transfer_params": {"do_remote_decode": True}}
    assert parse_completion(body, "tiny").kv_transfer_params == {"do_remote_decode": True}
    with pytest.raises(ApiError) as e:
        parse_completion({**body, "kv_transfer_params": [1]}, "tiny")
    assert e.value.param == "kv_transfer_params"


def test_lease_table_pins_until_release_or_expiry():
    pins = PinCounts()

    table = LeaseTable(pins.pin, pins.unpin, tick=0.02)
    try:
        a, n, exp = table.lease(["k1", "k2", "k3"], 30, lambda: 2)  # k3 is not stored
        assert n == 2 and exp > time.time() and pins == {"k1": 1, "k2": 1, "k3": 0}
        b, _, _ = table.lease(["k1"], 0.05, lambda: 1)
        assert pins["k1"] == 2 and table.active == 2
        wait_until(lambda: table.active == 1)
        assert pins["k1"] == 1
        assert table.release(a) and not table.release(a)
        assert set(pins.values()) == {0} and table.active == 0
        assert table.lease(["k9"], 1, lambda: 0) == ("", 0, 0.0) and pins["k9"] == 0
        with pytest.raises(ValueError, match="ttl_seconds"):
            table.lease(["k1"], 0, lambda: 1)
    finally:
        table.close()
