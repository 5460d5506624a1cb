"""Multi-round QA (LMCache's workload): TTFT and throughput with and without the connector.

    python benchmarks/multi_round_qa.py [--users 4] [--rounds 3] [--system 1000]
        [--question 100] [--answer 16] [--max-num-seqs 2] [--device cpu|cuda]
        [--json bench-results/multi_round_qa.json]

``--users`` users hold conversations of ``--rounds`` rounds. Every prompt is a shared
system prompt (``--system`` tokens), then the user's history (all earlier questions
and answers), then a new question (``--question`` tokens); answers are ``--answer``
tokens, greedy. In each round every user asks at once (one batch of requests); at most
``--max-num-seqs`` run concurrently, and the engine's KV cache (``--engine-kv``
tokens' worth) is too small to keep every user's history between rounds — the case a
KV store is for.

Modes:
  off        no connector: only the engine's own prefix cache.
  all        ``tiered`` with a cpu tier large enough for every chunk of every user.
  fraction   ``tiered`` with a cpu tier of ``--fraction`` of that (evictions: S3-FIFO).
  (``--save-decoded``: the connector modes also store the answers' KV, which the next
  round's prompt contains.)

Figures per mode: mean and p90 TTFT over the rounds after the first (round 1 is
cold for everyone), mean TTFT of round 1, output tokens/s over the whole run, and the
share of prompt tokens served by the engine's cache and by the store (``kv_sources``: at
each request's last admission, so a preempted request counts what its answer was
computed from). Model: the ``bench`` preset (``--model`` to change), float32, on
``--device`` (cpu by default, or cuda).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import percentile  # noqa: E402

from benchmarks.ttft import kv_bytes_per_token  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.presets import PRESETS  # noqa: E402

CHUNK = 256


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def run_mode(args: argparse.Namespace, kv: dict | None) -> dict:
    mc = PRESETS[args.model]
    per_token = kv_bytes_per_token(args.model, args.device)
    extra = {}
    if kv is not None:
        extra = {"kv_connector": "tiered", "kv_config": kv, "kv_save_decoded": args.save_decoded}
    llm = LLM(
        args.model,
        kv_cache_memory=args.engine_kv * per_token,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=2048,
        device=args.device,
        **extra,
    )
    rng = random.Random(args.seed)
    system = tokens(rng, args.system, mc.vocab_size)
    histories: list[list[int]] = [[] for _ in range(args.users)]
    params = SamplingParams(temperature=0.0, max_tokens=args.answer, ignore_eos=True)
    ttfts: list[list[float]] = []
    sources: dict[str, int] = {}
    generated = prompt_tokens = 0
    start = time.perf_counter()
    for _ in range(args.rounds):
        questions = [tokens(rng, args.question, mc.vocab_size) for _ in range(args.users)]
        batch = [system + h + q for h, q in zip(histories, questions, strict=True)]
        outs = llm.generate(batch, params)
        ttfts.append([o.metrics.ttft for o in outs])
        for i, o in enumerate(outs):
            histories[i] += questions[i] + o.token_ids
            generated += len(o.token_ids)
            prompt_tokens += len(o.prompt_token_ids)
            for k, v in o.metrics.kv_sources.items():
                sources[k] = sources.get(k, 0) + v
    wall = time.perf_counter() - start
    llm.close()
    later = [t for r in ttfts[1:] for t in r]
    return {
        "ttft_round1_mean": statistics.mean(ttfts[0]),
        "ttft_later_mean": statistics.mean(later) if later else None,
        "ttft_later_p90": percentile(later, 90) if len(later) > 1 else None,
        "output_tokens_per_s": generated / wall,
        "wall_s": wall,
        "prompt_tokens": prompt_tokens,
        "kv_sources": sources,
    }


def working_set_bytes(args: argparse.Namespace) -> int:
    """KV bytes of every user's final context: what the ``all`` store must hold."""
    per_token = kv_bytes_per_token(args.model, args.device)
    final = args.system + args.rounds * (args.question + args.answer)
    return args.users * final * per_token


def table(res: dict) -> str:
    lines = [
        f"{'mode':<9} {'ttft r1 s':>9} {'ttft later s':>12} {'p90 s':>7} {'out tok/s':>9} "
        f"{'engine %':>8} {'store %':>7}"
    ]
    for mode, r in res["modes"].items():
        src, total = r["kv_sources"], r["prompt_tokens"]
        store = sum(v for k, v in src.items() if k != "engine")
        later = r["ttft_later_mean"] or float("nan")
        p90 = r["ttft_later_p90"] or float("nan")
        lines.append(
            f"{mode:<9} {r['ttft_round1_mean']:>9.3f} {later:>12.3f} {p90:>7.3f} "
            f"{r['output_tokens_per_s']:>9.2f} {100 * src.get('engine', 0) / total:>7.1f}% "
            f"{100 * store / total:>6.1f}%"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bench")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--system", type=int, default=1000)
    p.add_argument("--question", type=int, default=100)
    p.add_argument("--answer", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=2)
    p.add_argument("--engine-kv", type=int, default=4096, help="engine KV cache size in tokens")
    p.add_argument("--fraction", type=float, default=0.4)
    p.add_argument("--modes", default="off,all,fraction")
    p.add_argument(
        "--save-decoded", action="store_true", help="connector modes also save answers' KV"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", default="bench-results/multi_round_qa.json")
    args = p.parse_args()
    need = working_set_bytes(args)
    configs = {
        "off": None,
        "all": {"tiers": ["cpu"], "chunk_size": CHUNK, "cpu.size": 2 * need},
        "fraction": {"tiers": ["cpu"], "chunk_size": CHUNK, "cpu.size": int(args.fraction * need)},
    }
    res: dict = {"args": vars(args), "working_set_bytes": need, "modes": {}}
    for mode in args.modes.split(","):
        res["modes"][mode] = run_mode(args, configs[mode])
        print(f"{mode}: {res['modes'][mode]}", flush=True)
    print(table(res))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
