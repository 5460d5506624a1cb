"""The engine on CUDA gives the same greedy tokens as on the CPU (run with -m gpu)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_tiny_on_cuda_matches_cpu():
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    prompts = [[5 + i for i in range(n)] for n in (3, 40, 130)]
    p = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cpu = LLM("tiny", device="cpu", kv_cache_memory="8MiB").generate(prompts, p)
    gpu_llm = LLM("tiny", device="cuda", dtype="float32", kv_cache_memory="8MiB")
    assert gpu_llm.engine.runner.kv_caches[0].is_cuda
    gpu = gpu_llm.generate(prompts, p)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    again = gpu_llm.generate(prompts[1:2], p)[0]  # a prefix-cache hit on the device
    assert again.metrics.num_cached_tokens == 32 and again.token_ids == cpu[1].token_ids


def test_bench_bf16_on_cuda_sizes_cache_from_free_memory():
    llm = LLM("bench", device="cuda", gpu_memory_utilization=0.2)
    assert llm.engine.runner.dtype == torch.float32  # presets are float32 checkpoints
    assert llm.engine.runner.num_blocks > 1000
    out = llm.generate([[7] * 300], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
