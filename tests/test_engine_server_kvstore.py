"""Engines sharing one ``kvstore serve`` daemon (issue 5's demo), and ``--kv-role``.

Two ``engine serve`` processes on one daemon (a module fixture): a long prompt answered
by A is a hit on B (from the daemon, the same greedy answer), but only for the same
``cache_salt``; after kill -9 of the daemon (the module's last engine test) both keep
answering correctly (misses, recomputed). Then ``--kv-role`` (a producer saves and never
loads, a consumer loads what it saved and never saves) and ``--kv-config FILE``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from daemon_proc import start_daemon
from engine_server_proc import start_engine

from benchmarks.harness import wait_until
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


@pytest.fixture(scope="module")
def shared():
    """A daemon and two engines A and B on it, for the module; the last test kills the daemon."""
    daemon = start_daemon("--cpu-size", "64MiB")
    args = [
        "--model",
        "tiny",
        "--max-num-seqs",
        "4",
        "--kvstore",
        daemon.url,
        "--kv-chunk-size",
        str(CHUNK),
    ]
    env = {"KVSTORE_REMOTE_TIMEOUT": "2", "KVSTORE_REMOTE_RETRY_AFTER": "0.2"}
    a = b = None
    try:
        a, b = start_engine(*args, env=env), start_engine(*args, env=env)
        with a.client() as ca, b.client() as cb:
            yield SimpleNamespace(daemon=daemon, ca=ca, cb=cb)
    finally:
        codes = [srv.stop() for srv in (a, b) if srv is not None]
        daemon.kill()
        assert all(code == 0 for code in codes), codes


def ask(client, prompt: str, salt: str | None = None):
    """Greedy text, cached prompt tokens, the ``kv`` block and the prompt's token count."""
    r = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        extra_body={"cache_salt": salt} if salt else None,
    )
    return (
        r.choices[0].text,
        r.usage.prompt_tokens_details.cached_tokens,
        r.kv,
        r.usage.prompt_tokens,
    )


# Defined (so run) before the test that kills the daemon.
def test_cache_salt_isolates_tenants_through_the_daemon(shared):
    """A's tenant-a KV in the daemon is a miss for tenant-b on B and a remote hit for
    tenant-a on B: the salt is in every chunk key, so tenants never share KV."""
    daemon, ca, cb = shared.daemon, shared.ca, shared.cb
    assert daemon.proc.poll() is None, "the daemon is gone: this test must run before the kill"
    prompt = long_prompt("tenant")  # new to both engines: no local prefix cache hit on B
    base = daemon_items(daemon.url)
    text_a, cached_a, _, n_tokens = ask(ca, prompt, "tenant-a")
    assert cached_a == 0
    chunks = n_tokens // CHUNK
    wait_until(lambda: daemon_items(daemon.url) >= base + chunks, 20)  # A's chunks are in
    text_b, cached_b, kv_b, _ = ask(cb, prompt, "tenant-b")
    assert (text_b, cached_b, kv_b["sources"]) == (text_a, 0, {})
    # B stored tenant-b's chunks under their own keys, beside tenant-a's
    wait_until(lambda: daemon_items(daemon.url) >= base + 2 * chunks, 20)
    # B's own cache holds only tenant-b blocks, so a tenant-a hit can only come from A's
    text_t, cached_t, kv_t, _ = ask(cb, prompt, "tenant-a")
    assert text_t == text_a
    assert n_tokens % CHUNK  # every full chunk loads (none left to compute the last token)
    assert cached_t == chunks * CHUNK and kv_t["sources"] == {"remote": cached_t}


def test_two_engines_share_kv_through_the_daemon_and_survive_its_death(shared):
    daemon, ca, cb = shared.daemon, shared.ca, shared.cb
    prompt = long_prompt("shared")
    base = daemon_items(daemon.url)  # what earlier tests of the module stored
    text_a, cached_a, _, n_tokens = ask(ca, prompt)
    assert cached_a == 0
    wait_until(lambda: daemon_items(daemon.url) >= base + n_tokens // CHUNK, 20)
    text_b, cached_b, kv_b, _ = ask(cb, prompt)
    assert text_b == text_a
    assert cached_b >= CHUNK and kv_b["sources"].get("remote") == cached_b

    daemon.kill()  # kill -9 between requests
    other = long_prompt("afterdeath")
    want = LLM("tiny").generate(other, SamplingParams(temperature=0, max_tokens=8))[0].text
    for client in (ca, cb):
        text, cached, _, _ = ask(client, other)
        assert (text, cached) == (want, 0)
        assert ask(client, prompt)[0] == text_a  # the engines' own caches still serve


def _run(engine: LLMEngine, prompt: list[int]):
    req = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2))
    while True:
        for out in engine.step():
            if out.request_id == req.request_id and out.finished:
                return out


@pytest.mark.parametrize(
    "role,saves,loads",
    [("both", True, True), ("producer", True, False), ("consumer", False, False)],
)
def test_kv_role_producer_only_saves_and_consumer_only_loads(role, saves, loads):
    config = EngineConfig(
        model="tiny",
        kv_cache_memory="4MiB",
        enable_prefix_caching=False,
        kv_connector="tiered",
        kv_config={"tiers": ["cpu"], "cpu.size": "16MiB", "chunk_size": CHUNK},
        kv_role=role,
    )
    engine = LLMEngine(config)
    try:
        prompt = list(range(10, 10 + 5 * CHUNK + 3))
        first = _run(engine, prompt)
        store = engine.connector.store
        if saves:
            wait_until(lambda: store.stats()["cpu"].items == 5, 20)
        else:
            time.sleep(0.3)
            assert store.stats()["cpu"].items == 0
        again = _run(engine, prompt)  # no prefix caching: only the store can serve it
        assert again.token_ids == first.token_ids
        assert again.metrics.kv_sources.get("cpu", 0) == (5 * CHUNK if loads else 0)
    finally:
        engine.close()


def test_a_consumer_loads_what_a_producer_saved(tmp_path):
    """Two engines, one after the other, on one disk directory: the producer saves and
    never loads, the consumer loads (the same greedy tokens) and never saves."""
    kv = {
        "tiers": ["disk"],
        "disk.path": str(tmp_path),
        "disk.size": "64MiB",
        "disk.fsync": False,
        "chunk_size": CHUNK,
    }

    def engine(role: str) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model="tiny",
                kv_cache_memory="4MiB",
                enable_prefix_caching=False,
                kv_connector="tiered",
                kv_config=kv,
                kv_role=role,
            )
        )

    prompt = list(range(10, 10 + 5 * CHUNK + 3))
    producer = engine("producer")
    try:
        first = _run(producer, prompt)
        store = producer.connector.store
        wait_until(lambda: store.stats()["disk"].items == 5, 20)
        assert _run(producer, prompt).metrics.kv_sources.get("disk", 0) == 0  # never loads
    finally:
        producer.close()
    consumer = engine("consumer")
    try:
        got = _run(consumer, prompt)
        assert got.token_ids == first.token_ids
        assert got.metrics.kv_sources.get("disk", 0) == 5 * CHUNK
        _run(consumer, list(range(300, 300 + 3 * CHUNK + 1)))
        time.sleep(0.3)
        assert consumer.connector.store.stats()["disk"].items == 5  # saved nothing new
    finally:
        consumer.close()


def test_engine_serve_takes_a_store_config_file(tmp_path):
    """``engine serve --kv-connector tiered --kv-config FILE``: the tiers come from the
    file; a second server on the same disk directory loads what the first saved."""
    config = tmp_path / "kv.yaml"
    config.write_text(
        f"tiers: [disk]\ndisk:\n  path: {tmp_path / 'disk'}\n  size: 64MiB\n"
        f"  fsync: false\nchunk_size: {CHUNK}\n"
    )
    args = ["--model", "tiny", "--kv-connector", "tiered", "--kv-config", str(config)]
    prompt = long_prompt("config")
    first = start_engine(*args)
    try:
        with first.client() as c:
            text, cached, kv, tokens = ask(c, prompt)
        assert cached == 0
        saved = (tokens // CHUNK) * CHUNK  # whole chunks of the prompt

        def files() -> int:  # chunk files the disk tier has renamed into place
            return sum(
                1
                for p in (tmp_path / "disk").rglob("*")
                if p.is_file() and not p.name.startswith(".")
            )

        wait_until(lambda: files() >= saved // CHUNK, 20)
    finally:
        assert first.stop() == 0
    second = start_engine(*args)
    try:
        with second.client() as c:
            text2, cached2, kv2, _ = ask(c, prompt)
        assert text2 == text and cached2 == saved > 0
        assert kv2["sources"] == {"disk": saved}
    finally:
        assert second.stop() == 0
