"""Greedy output of the engine equals HF transformers' generate() for the same weights."""

from __future__ import annotations

import random

import pytest
from hf_models import VOCAB, hf_greedy, make_checkpoint

from engine import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
NEW_TOKENS = 12
PROMPT_LENS = (5, 17, 40, 70, 100)  # 100 > Mistral's sliding window of 48
SHARED = 48  # tokens shared by the prefix-cache prompts: three full blocks


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    """(checkpoint dir, prompts, HF references) for one architecture."""
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    model = make_checkpoint(arch, path)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    shared = [rng.randrange(3, VOCAB) for _ in range(SHARED)]
    prompts += [shared + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 11, 30)]
    refs = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    return str(path), prompts, refs


def test_batch_of_one(case):
    path, prompts, refs = case
    llm = LLM(path, enable_prefix_caching=False)
    for prompt, ref in zip(prompts, refs, strict=True):
        assert llm.generate([prompt], greedy())[0].token_ids == ref


@pytest.mark.parametrize("attention", ["paged", "sdpa"])
def test_batch_of_several(case, attention):
    path, prompts, refs = case
    llm = LLM(path, attention_backend=attention, device="cpu" if attention == "paged" else "auto")
    assert (llm.engine.runner.kernel is not None) == (attention == "paged")
    outs = llm.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == refs


def test_prefix_cache_hits(case):
    path, prompts, refs = case
    llm = LLM(path)
    first = llm.generate([prompts[-3]], greedy())[0]
    assert first.metrics.num_cached_tokens == 0
    outs = llm.generate(prompts[-2:], greedy())
    assert [o.metrics.num_cached_tokens for o in outs] == [SHARED, SHARED]
    assert [first.token_ids] + [o.token_ids for o in outs] == refs[-3:]
    again = llm.generate([prompts[2]], greedy())  # a warm repeat of an unrelated prompt
    assert again[0].token_ids == refs[2]
    llm.engine.kv.check_integrity()


def test_chunked_prefill(case):
    path, prompts, refs = case
    llm = LLM(path, max_num_batched_tokens=16)
    steps = 0
    original = llm.engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return original()

    llm.engine.step = counting_step
    out = llm.generate([prompts[4]], greedy())[0]  # 100 tokens in chunks of 16
    assert out.token_ids == refs[4]
    assert steps == -(-len(prompts[4]) // 16) + NEW_TOKENS - 1
    outs = llm.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == refs


def test_preemption(case):
    path, prompts, refs = case
    # 12 blocks of 16 tokens: not enough for all prompts at once, so some are preempted
    llm = LLM(path, kv_cache_memory=12 * _bytes_per_block(path), max_num_seqs=8)
    outs = llm.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == refs
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.pool.num_free_blocks == 12


def _bytes_per_block(path: str) -> int:
    return LLM(path, kv_cache_memory="1MiB").engine.runner.bytes_per_block
