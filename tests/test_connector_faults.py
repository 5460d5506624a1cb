"""A store that fails, dies or returns corrupt KV never changes an answer."""

from __future__ import annotations

import os
import signal
import time

import pytest
from connector_cases import (
    CHUNK,
    checkpoint,
    greedy,
    prompts,
    reference,
    run,
    store_config,
    tiered_llm,
)

from engine.errors import KVLoadError


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = checkpoint(tmp_path_factory.mktemp("ckpt"))
    a, _ = prompts(seed=5)
    return model, a, reference(model, [a])[0]


def corrupt_chunk_file(llm, prompt: list[int], index: int) -> None:
    """Flip the last payload byte of the stored file of chunk ``index`` of ``prompt``."""
    conn = llm.engine.connector
    req = llm.engine.add_request(prompt, request_id="probe")
    key = conn.chunk_refs(req)[index].key
    llm.engine.abort_request("probe")
    disk = next(t.backend for t in conn.store.tiers if t.name == "disk")
    with open(disk.path_of(key), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


def test_a_checksum_failure_is_recomputed_not_used(case, tmp_path):
    model, a, ref = case
    with tiered_llm(model, store_config("disk", tmp_path)) as llm:
        run(llm, a)
        corrupt_chunk_file(llm, a, 2)
        out = run(llm, a)
        assert out.token_ids == ref
        # chunks 0 and 1 loaded; chunk 2 failed its checksum, so 2 and 3 recomputed
        assert out.metrics.kv_sources == {"engine": 0, "disk": 2 * CHUNK}
        assert llm.engine.connector.store.stats()["disk"].checksum_failures == 1
        again = run(llm, a)  # the recomputed chunks were saved again
        assert again.token_ids == ref and again.metrics.kv_sources["disk"] == 4 * CHUNK


def test_fail_policy_raises_a_clear_error(case, tmp_path):
    model, a, ref = case
    with tiered_llm(model, store_config("disk", tmp_path), kv_load_failure_policy="fail") as llm:
        run(llm, a)
        corrupt_chunk_file(llm, a, 0)
        with pytest.raises(KVLoadError, match="kv_load_failure_policy is 'fail'"):
            llm.generate([a])
        assert not llm.engine.has_unfinished()
        llm.engine.kv.check_integrity()
        assert run(llm, a).token_ids == ref  # the engine serves on (chunk 0 was dropped)


def test_redis_dying_mid_load_leaves_the_answer_unchanged(
    case, tmp_path, redis_factory, monkeypatch
):
    model, a, ref = case
    proc, url = redis_factory()
    cfg = store_config(
        "redis", tmp_path, **{"redis.url": url, "redis.timeout": 1.0, "redis.connect_timeout": 0.5}
    )
    with tiered_llm(model, cfg) as llm:
        run(llm, a)
        store = llm.engine.connector.store
        real_get = store.get_layers_async

        def die_then_get(keys, outs, sink):  # the lookup succeeded; the server dies now
            proc.kill()
            proc.wait()
            return real_get(keys, outs, sink)

        monkeypatch.setattr(store, "get_layers_async", die_then_get)
        start = time.monotonic()
        out = run(llm, a)
        assert out.token_ids == ref
        assert out.metrics.kv_sources == {"engine": 0}  # nothing loaded: all recomputed
        assert time.monotonic() - start < 10
        assert proc.poll() is not None
        assert run(llm, a).token_ids == ref  # and the engine serves on without the tier


def test_a_load_past_its_deadline_is_recomputed(case, tmp_path, redis_factory, monkeypatch):
    """A frozen server: the load misses its 0.3 s deadline long before redis times out."""
    model, a, ref = case
    proc, url = redis_factory()
    cfg = store_config("redis", tmp_path, **{"redis.url": url, "redis.timeout": 5.0})
    with tiered_llm(model, cfg, kv_load_timeout=0.3) as llm:
        run(llm, a)
        store = llm.engine.connector.store
        real_get = store.get_layers_async

        def freeze_then_get(keys, outs, sink):
            os.kill(proc.pid, signal.SIGSTOP)
            return real_get(keys, outs, sink)

        monkeypatch.setattr(store, "get_layers_async", freeze_then_get)
        try:
            out = llm.generate([a], greedy())[0]
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert out.token_ids == ref
        assert out.metrics.kv_sources == {"engine": 0}
        assert out.metrics.ttft < 4.0  # well under the 5 s socket timeout


def test_a_forward_pass_that_fails_midway_stores_none_of_its_kv(case, tmp_path):
    """A step whose model raises after layer 0 has staged its saves with the later layers
    never computed. They used to be stored anyway (checksummed garbage under the prompt's
    keys); now nothing of the step is stored, and the prompt answers right later."""
    model, a, want = case
    llm = tiered_llm(model, store_config("cpu", tmp_path))
    engine = llm.engine
    hook = engine.runner.after_layer

    def failing(i, kv):
        hook(i, kv)
        raise RuntimeError("injected failure after layer 0")

    engine.runner.after_layer = failing
    req = engine.add_request(a, greedy(), request_id="doomed")
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    engine.runner.after_layer = hook
    engine.abort_request("doomed")
    engine.connector.flush()
    keys = [r.key for r in engine.connector.chunk_refs(req)]
    assert len(keys) == len(a) // CHUNK and engine.connector.store.locate(keys) == []
    assert run(llm, a).token_ids == want
