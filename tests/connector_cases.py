"""Shared set-up of the connector tests: a tiny HF checkpoint, prompts, references.

The ``tiny`` preset is not used here: its near-uniform logits let the argmax flip
between two numerically equal-in-exact-arithmetic attention paths (full causal vs a
cached prefix), so "equal to the answer computed from scratch" would test rounding,
not KV. The checkpoints of ``hf_models`` have larger weights for that reason.
"""

from __future__ import annotations

import random
from pathlib import Path

from hf_models import VOCAB, make_checkpoint

from engine import LLM, SamplingParams

BS = 16
CHUNK = 32  # two blocks per chunk: many chunks in short prompts
NEW_TOKENS = 6
PROMPT_LEN = 150  # 4 full chunks (128 tokens) are loadable, 22 tokens always compute
SHARED = 100  # a second prompt shares 100 tokens: mid-chunk (96..128) and mid-block (96..112)


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def prompts(seed: int = 11) -> tuple[list[int], list[int]]:
    """A prompt and another sharing its first ``SHARED`` tokens."""
    rng = random.Random(seed)
    a = [rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN)]
    b = a[:SHARED] + [rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN - SHARED)]
    return a, b


def checkpoint(path: Path) -> str:
    make_checkpoint("llama", path)
    return str(path)


def reference(model: str, ps: list[list[int]]) -> list[list[int]]:
    """Greedy outputs computed from scratch (no cache of any kind)."""
    llm = LLM(model, enable_prefix_caching=False)
    return [o.token_ids for o in llm.generate(ps, greedy())]


def store_config(tiers: str, tmp: Path, **extra) -> dict:
    """A small store of ``tiers`` (comma-separated) for the tests."""
    cfg = {
        "tiers": tiers,
        "chunk_size": CHUNK,
        "cpu.size": "16MiB",
        "cpu.page_size": "16KiB",
        "disk.path": str(tmp / "disk"),
        "disk.size": "64MiB",
        "disk.fsync": False,
    }
    cfg.update(extra)
    return cfg


def tiered_llm(model: str, kv_config, **kw) -> LLM:
    kw.setdefault("enable_prefix_caching", False)  # every hit must come from the store
    return LLM(model, kv_connector="tiered", kv_config=kv_config, block_size=BS, **kw)


def run(llm: LLM, prompt: list[int]):
    """Generate ``prompt`` greedily and wait until its chunks are stored."""
    out = llm.generate([prompt], greedy())[0]
    llm.engine.connector.flush()
    return out
