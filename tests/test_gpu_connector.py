"""The tiered connector with the engine on CUDA: KV saved from, and loaded into, a
device-resident paged cache gives the from-scratch answer (run with -m gpu)."""

from __future__ import annotations

import pytest
import torch
from connector_cases import (
    CHUNK,
    PROMPT_LEN,
    SHARED,
    checkpoint,
    greedy,
    prompts,
    run,
    store_config,
    tiered_llm,
)

from engine import LLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
LOADABLE = (PROMPT_LEN - 1) // CHUNK * CHUNK
SHARED_CHUNKS = SHARED // CHUNK * CHUNK


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = checkpoint(tmp_path_factory.mktemp("ckpt"))
    a, b = prompts()
    llm = LLM(model, device="cuda", dtype="float32", enable_prefix_caching=False)
    return model, a, b, [o.token_ids for o in llm.generate([a, b], greedy())]


@pytest.mark.parametrize("tiers", ["cpu", "gpu,cpu", "cpu,disk"])
def test_cuda_cache_loads_from_each_tier(tiers, case, tmp_path):
    model, a, b, (ref_a, ref_b) = case
    config = store_config(tiers, tmp_path, **{"gpu.size": "16MiB", "gpu.page_size": "16KiB"})
    with tiered_llm(model, config, device="cuda", dtype="float32") as llm:
        assert llm.engine.runner.kv_caches[0].is_cuda
        assert run(llm, a).token_ids == ref_a
        warm = run(llm, a)
        first = tiers.split(",")[0]
        assert warm.token_ids == ref_a and warm.metrics.kv_sources == {"engine": 0, first: LOADABLE}
        other = run(llm, b)
        assert other.token_ids == ref_b and other.metrics.kv_sources == {
            "engine": 0,
            first: SHARED_CHUNKS,
        }
        llm.engine.kv.check_integrity()


def test_cuda_engine_reads_a_disk_tier_written_by_a_cpu_engine(case, tmp_path):
    """KV saved by an engine on the CPU is loaded by one on CUDA (same fingerprint:
    model, float32, layout), and the answer is unchanged."""
    model, a, _, (ref_a, _) = case
    config = store_config("disk", tmp_path)
    with tiered_llm(model, config, device="cpu", attention_backend="sdpa") as cpu_llm:
        run(cpu_llm, a)
    with tiered_llm(model, config, device="cuda", dtype="float32") as gpu_llm:
        warm = run(gpu_llm, a)
    assert warm.token_ids == ref_a and warm.metrics.kv_sources == {"engine": 0, "disk": LOADABLE}
