"""The benchmark workload: a fixed-seed mix of prompt and output lengths.

Standard library only (and ``harness.py`` beside it, which is too), so any interpreter
can load it (the vLLM runner gets the workload as JSON instead, and never imports
project code).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from harness import percentile


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(
    num_requests: int = 64,
    *,
    seed: int = 0,
    vocab_size: int = 32000,
    prompt_len: tuple[int, int] = (32, 1024),
    output_len: tuple[int, int] = (16, 256),
) -> list[Request]:
    """`num_requests` requests with prompt and output lengths drawn uniformly
    (inclusive ranges) and random token ids in [0, vocab_size)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        plen = rng.randint(*prompt_len)
        olen = rng.randint(*output_len)
        ids = [rng.randrange(vocab_size) for _ in range(plen)]
        out.append(Request(ids, olen))
    return out


def to_json(workload: list[Request]) -> list[dict]:
    return [asdict(r) for r in workload]


def from_json(items: list[dict]) -> list[Request]:
    return [Request(list(d["prompt_token_ids"]), int(d["max_tokens"])) for d in items]


def summarize(
    wall_s: float,
    workload: list[Request],
    output_token_counts: list[int],
    ttfts: list[float],
) -> dict:
    """Throughput and TTFT figures shared by every mode."""
    out_tokens = sum(output_token_counts)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in workload)
    return {
        "num_requests": len(workload),
        "wall_s": wall_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else float("nan"),
        "total_tok_s": (out_tokens + prompt_tokens) / wall_s if wall_s > 0 else float("nan"),
        "req_s": len(workload) / wall_s if wall_s > 0 else float("nan"),
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else float("nan"),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "output_len_mismatches": sum(
            1 for r, n in zip(workload, output_token_counts, strict=True) if n != r.max_tokens
        ),
    }
