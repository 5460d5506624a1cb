"""KV saved through the tiered connector loads back with the answer unchanged, per tier."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from connector_cases import (
    CHUNK,
    PROMPT_LEN,
    SHARED,
    checkpoint,
    greedy,
    prompts,
    reference,
    run,
    store_config,
    tiered_llm,
)

from engine import LLM, InvalidRequestError, SamplingParams
from kvcore.events import AllBlocksCleared, BlockRemoved, BlockStored

LOADABLE = (PROMPT_LEN - 1) // CHUNK * CHUNK  # 128: whole chunks that leave a token to compute
SHARED_CHUNKS = SHARED // CHUNK * CHUNK  # 96


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(checkpoint, prompt a, prompt b sharing 100 tokens, their from-scratch outputs)."""
    model = checkpoint(tmp_path_factory.mktemp("ckpt"))
    a, b = prompts()
    return model, a, b, reference(model, [a, b, a[:128]])


@pytest.mark.parametrize(
    "tier, server", [("cpu", None), ("disk", None), ("redis", "redis_url"), ("redis", "valkey_url")]
)
def test_loaded_kv_gives_the_same_answer(tier, server, case, tmp_path, request):
    model, a, b, (ref_a, ref_b, _) = case
    extra = {}
    if server is not None:  # a private namespace per test on the session's server
        extra = {
            "redis.url": request.getfixturevalue(server),
            "redis.namespace": f"{tmp_path.name}:",
        }
    with tiered_llm(model, store_config(tier, tmp_path, **extra)) as llm:
        cold = run(llm, a)
        assert cold.token_ids == ref_a and cold.metrics.kv_sources == {"engine": 0}
        warm = run(llm, a)
        assert warm.token_ids == ref_a
        assert warm.metrics.kv_sources == {"engine": 0, tier: LOADABLE}
        # b shares 100 tokens: three whole chunks load, the 4th chunk (96..128) does not
        # match past token 100, so the prefix ends mid-chunk and mid-block and computes.
        other = run(llm, b)
        assert other.token_ids == ref_b
        assert other.metrics.kv_sources == {"engine": 0, tier: SHARED_CHUNKS}
        llm.engine.kv.check_integrity()


def test_a_prompt_stored_to_its_end_loads_its_last_chunk_in_part(case, tmp_path):
    """128 tokens = 4 whole chunks stored; the load stops one token short (127, mid-block)
    so that the prompt's last token computes, alone, as a decode step over the loaded KV:
    the last chunk is fetched whole and used in part."""
    model, a, _, (_, _, ref) = case
    with tiered_llm(model, store_config("cpu", tmp_path)) as llm:
        assert run(llm, a[:128]).token_ids == ref
        warm = run(llm, a[:128])
        assert warm.token_ids == ref and warm.metrics.kv_sources == {"engine": 0, "cpu": 127}


def test_load_staging_is_reused_from_request_to_request(case, tmp_path):
    """Host staging comes from the connector's pool: later loads allocate nothing new, and
    the answers stay exact while buffers are reused (each load overwrites the last's)."""
    model, a, b, (ref_a, ref_b, _) = case
    with tiered_llm(model, store_config("cpu", tmp_path)) as llm:
        run(llm, a), run(llm, b)
        pool = llm.engine.connector._staging
        assert run(llm, a).token_ids == ref_a
        allocated = pool.allocated
        assert allocated >= LOADABLE // CHUNK and len(pool) == allocated
        for _ in range(2):
            assert run(llm, b).token_ids == ref_b
            assert run(llm, a).token_ids == ref_a
        assert pool.allocated == allocated and len(pool) == allocated


def test_the_staging_pool_keeps_a_bounded_number_of_buffers():
    import torch

    from connector.staging import StagingPool

    pool = StagingPool((4, 1024), torch.float32, keep_bytes=3 * 4 * 1024 * 4)
    first = pool.take(5)
    assert pool.allocated == 5 and all(t.shape == (4, 1024) for t in first)
    pool.give(first)
    assert len(pool) == 3  # two dropped: over the byte budget
    again = pool.take(4)
    assert pool.allocated == 6 and sum(any(t is f for f in first) for t in again) == 3


def test_saved_decoded_tokens_serve_the_next_turn(case, tmp_path):
    """With kv_save_decoded, a follow-up prompt (prompt + answer + more) loads the chunk the
    answer completed: 150 prompt + 40 generated tokens fill chunk 4 (128..160)."""
    model, a, _, _ = case
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    with tiered_llm(model, store_config("cpu", tmp_path), kv_save_decoded=True) as llm:
        answer = llm.generate([a], params)[0].token_ids
        llm.engine.connector.flush()
        follow_up = a + answer + [5, 6, 7]
        ref = reference(model, [follow_up])[0]
        out = run(llm, follow_up)
        assert out.token_ids == ref
        assert out.metrics.kv_sources == {"engine": 0, "cpu": 160}  # 5 chunks: one decoded


def test_engine_prefix_then_store_after_evictions(case, tmp_path):
    """Engine-cache hits come first; what the engine evicted loads from the store."""
    model, a, b, (ref_a, ref_b, _) = case
    evictor = prompts(seed=99)[0]
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4  # layers * (k, v) * block * kv heads * head_dim * f32
    with tiered_llm(
        model,
        store_config("cpu", tmp_path),
        enable_prefix_caching=True,
        kv_cache_memory=15 * block_bytes,
        max_num_seqs=1,
        enable_kv_events=True,
    ) as llm:
        run(llm, a)  # a: blocks 0-9
        assert run(llm, b).token_ids == ref_b  # b: a's blocks 0-5 plus 4 fresh ones
        llm.engine.take_kv_events()
        run(llm, evictor)  # 10 blocks from the LRU head: a's tail blocks 9, 8, 7, 6, 5 go
        removed = [e for e in llm.engine.take_kv_events() if isinstance(e, BlockRemoved)]
        a_hashes = llm.engine.add_request(a, request_id="probe").block_hashes
        llm.engine.abort_request("probe")
        assert {e.medium for e in removed} == {"GPU"}
        assert set(a_hashes[5:9]) <= {h for e in removed for h in e.block_hashes}
        again = run(llm, a)
        assert again.token_ids == ref_a
        # the engine keeps a's first 5 blocks (80 tokens, mid-chunk): the store serves the
        # rest of chunk 2 (80..96) and chunk 3 (96..128)
        assert again.metrics.kv_sources == {"engine": 80, "cpu": LOADABLE - 80}
        llm.engine.kv.check_integrity()


def test_kv_sources_describe_the_admission_after_a_preemption(case, tmp_path):
    """Two prompts fill the engine's 20 blocks; when a's decode needs an 11th block, b is
    preempted. b comes back after a finishes and loads its 4 saved prompt chunks: its
    kv_sources say so (they used to keep the first admission's figures)."""
    model, a, b, _ = case
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = [o.token_ids for o in LLM(model, enable_prefix_caching=False).generate([a, b], params)]
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4
    with tiered_llm(model, store_config("cpu", tmp_path), kv_cache_memory=20 * block_bytes) as llm:
        out_a, out_b = llm.generate([a, b], params)
        assert [out_a.token_ids, out_b.token_ids] == ref
        assert out_a.metrics.num_preemptions == 0 and out_b.metrics.num_preemptions >= 1
        assert out_a.metrics.kv_sources == {"engine": 0}
        assert out_b.metrics.kv_sources == {"engine": 0, "cpu": LOADABLE}
        llm.engine.kv.check_integrity()


def test_kv_sources_count_prompt_tokens_only(case, tmp_path):
    """With kv_save_decoded, b's 5th chunk (128..160) holds prompt and generated tokens;
    after its preemption b loads all 5 chunks, but only its 150 prompt tokens count."""
    model, a, b, _ = case
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = [o.token_ids for o in LLM(model, enable_prefix_caching=False).generate([a, b], params)]
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4
    with tiered_llm(
        model, store_config("cpu", tmp_path), kv_cache_memory=20 * block_bytes, kv_save_decoded=True
    ) as llm:
        out_a, out_b = llm.generate([a, b], params)
        assert [out_a.token_ids, out_b.token_ids] == ref and out_b.metrics.num_preemptions >= 1
        assert out_b.metrics.kv_sources == {"engine": 0, "cpu": PROMPT_LEN}


def test_a_second_process_reuses_the_disk_tier(case, tmp_path):
    model = case[0]
    text = "the quick brown fox jumps over the lazy dog; " * 5
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "generate",
        "--model",
        model,
        "--prompt",
        text,
        "--max-tokens",
        "6",
        "--json",
        "--kv-connector",
        "tiered",
        "--kv-chunk-size",
        str(CHUNK),
        "--kv-cpu-size",
        "16MiB",
        "--kv-disk-path",
        str(tmp_path / "disk"),
    ]
    outs = [
        json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        for _ in range(2)
    ]
    first, second = (o["metrics"]["kv_sources"] for o in outs)
    assert first == {"engine": 0}
    assert second["engine"] == 0 and second["disk"] > 0 and "cpu" not in second
    assert outs[0]["token_ids"] == outs[1]["token_ids"]


def test_kv_events_name_their_medium(case, tmp_path):
    model, a, _, _ = case
    with tiered_llm(
        model, store_config("cpu,disk", tmp_path), enable_prefix_caching=True, enable_kv_events=True
    ) as llm:
        req = llm.engine.add_request(a, greedy(), request_id="a")  # 156 tokens: 9 full blocks
        hashes = list(req.block_hashes)
        while llm.engine.has_unfinished():
            llm.engine.step()
        llm.engine.connector.flush()
        events = llm.engine.take_kv_events()
        stored = {e.medium: e for e in events if isinstance(e, BlockStored)}
        assert set(stored) == {"GPU", "CPU", "DISK"}
        assert stored["GPU"].block_hashes == hashes[: PROMPT_LEN // 16]  # engine: every full block
        assert stored["GPU"].parent_block_hash is None
        assert stored["CPU"].block_hashes == hashes[: PROMPT_LEN // CHUNK * 2]  # whole chunks
        assert stored["DISK"].token_ids == a[: PROMPT_LEN // CHUNK * CHUNK]
        assert llm.engine.take_kv_events() == []
        assert llm.engine.kv.pool.reset_prefix_cache()
        assert llm.engine.take_kv_events() == []  # recorded at the next step
        llm.generate([a[:40]])
        kinds = [type(e) for e in llm.engine.take_kv_events()]
        assert kinds[0] is AllBlocksCleared and BlockRemoved not in kinds


def test_bad_connector_settings_are_clear_errors(case, tmp_path):
    model = case[0]
    with pytest.raises(InvalidRequestError, match="kv_connector must be one of"):
        LLM(model, kv_connector="nope")
    with pytest.raises(InvalidRequestError, match="kv_load_failure_policy"):
        LLM(model, kv_connector="tiered", kv_load_failure_policy="retry")
    with pytest.raises(InvalidRequestError, match="kv_config is set"):
        LLM(model, kv_config={"tiers": "cpu"})
    with pytest.raises(InvalidRequestError, match="not a multiple of the engine's block_size"):
        tiered_llm(model, store_config("cpu", tmp_path, chunk_size=24))
    with pytest.raises(InvalidRequestError, match="unknown key"):
        tiered_llm(model, {"cpu.bogus": 1})


def test_cli_kv_flags_are_checked(tmp_path, capsys):
    from engine.cli import main

    assert main(["generate", "--prompt", "hi", "--kv-cpu-size", "1GiB"]) == 2
    assert "need --kv-connector tiered" in capsys.readouterr().err
    bad = ["generate", "--prompt", "hi", "--kv-connector", "tiered"]
    assert main([*bad, "--kv-config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main([*bad, "--kv-cpu-size", "lots"]) == 2
    assert "cpu.size" in capsys.readouterr().err


@pytest.mark.gpu
def test_loaded_kv_gives_the_same_answer_on_cuda(case, tmp_path):
    """On CUDA loads copy from pinned staging on a side stream, layer by layer."""
    import torch

    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    model, a, b, _ = case
    with tiered_llm(model, store_config("cpu", tmp_path), device="cuda", dtype="float32") as llm:
        assert llm.engine.connector._load_stream is not None
        cold = run(llm, a)
        for _ in range(3):
            warm = run(llm, a)
            assert warm.token_ids == cold.token_ids
            assert warm.metrics.kv_sources == {"engine": 0, "cpu": LOADABLE}
        other = run(llm, b)
        assert other.metrics.kv_sources == {"engine": 0, "cpu": SHARED_CHUNKS}
        scratch = LLM(model, device="cuda", dtype="float32", enable_prefix_caching=False)
        assert scratch.generate([b], greedy())[0].token_ids == other.token_ids
