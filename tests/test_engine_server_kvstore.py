"""Engines sharing one ``kvstore serve`` daemon (issue 5's demo), and ``--kv-role``.

Two ``engine serve`` processes on one daemon: a long prompt answered by A is a hit on B
(from the daemon, the same greedy answer); after kill -9 of the daemon both keep
answering correctly (misses, recomputed).
"""

from __future__ import annotations

import time

import pytest
from daemon_proc import start_daemon
from engine_server_proc import start_engine

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from store.client import KVStoreClient

pytest.importorskip("openai")

CHUNK = 32  # tokens per stored chunk: small, so a ~200-token prompt is several chunks


def long_prompt(tag: str) -> str:
    return " ".join(f"{tag}{i % 5} ipsum{i}" for i in range(20))


def daemon_items(url: str) -> int:
    with KVStoreClient(url) as c:
        return sum(max(t.items, 0) for t in c.stats().tiers)


def wait_for(cond, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_two_engines_share_kv_through_the_daemon_and_survive_its_death():
    daemon = start_daemon("--cpu-size", "64MiB")
    args = ["--model", "tiny", "--max-num-seqs", "4", "--kvstore", daemon.url,
            "--kv-chunk-size", str(CHUNK)]  # fmt: skip
    env = {"KVSTORE_REMOTE_TIMEOUT": "2", "KVSTORE_REMOTE_RETRY_AFTER": "0.2"}
    a = b = None
    try:
        a, b = start_engine(*args, env=env), start_engine(*args, env=env)
        with a.client() as ca, b.client() as cb:

            def ask(client, prompt):
                r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                              temperature=0)  # fmt: skip
                return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens, r.kv

            prompt = long_prompt("shared")
            text_a, cached_a, _ = ask(ca, prompt)
            assert cached_a == 0
            n_tokens = ca.completions.create(
                model="tiny", prompt=prompt, max_tokens=1
            ).usage.prompt_tokens
            wait_for(lambda: daemon_items(daemon.url) >= n_tokens // CHUNK)
            text_b, cached_b, kv_b = ask(cb, prompt)
            assert text_b == text_a
            assert cached_b >= CHUNK and kv_b["sources"].get("remote") == cached_b

            daemon.kill()  # kill -9 between requests
            other = long_prompt("afterdeath")
            want = LLM("tiny").generate(other, SamplingParams(temperature=0, max_tokens=8))[0].text
            for client in (ca, cb):
                text, cached, _ = ask(client, other)
                assert (text, cached) == (want, 0)
                assert ask(client, prompt)[0] == text_a  # the engines' own caches still serve
    finally:
        for srv in (a, b):
            if srv is not None:
                assert srv.stop() == 0
        daemon.kill()


def _run(engine: LLMEngine, prompt: list[int]):
    req = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2))
    while True:
        for out in engine.step():
            if out.request_id == req.request_id and out.finished:
                return out


@pytest.mark.parametrize("role,saves,loads", [("both", True, True), ("producer", True, False),
                                              ("consumer", False, False)])  # fmt: skip
def test_kv_role_producer_only_saves_and_consumer_only_loads(role, saves, loads):
    config = EngineConfig(model="tiny", kv_cache_memory="4MiB", enable_prefix_caching=False,
                          kv_connector="tiered",
                          kv_config={"tiers": ["cpu"], "cpu.size": "16MiB", "chunk_size": CHUNK},
                          kv_role=role)  # fmt: skip
    engine = LLMEngine(config)
    try:
        prompt = list(range(10, 10 + 5 * CHUNK + 3))
        first = _run(engine, prompt)
        store = engine.connector.store
        if saves:
            wait_for(lambda: store.stats()["cpu"].items == 5)
        else:
            time.sleep(0.3)
            assert store.stats()["cpu"].items == 0
        again = _run(engine, prompt)  # no prefix caching: only the store can serve it
        assert again.token_ids == first.token_ids
        assert again.metrics.kv_sources.get("cpu", 0) == (5 * CHUNK if loads else 0)
    finally:
        engine.close()
