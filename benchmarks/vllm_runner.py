"""Run the benchmark workload through vLLM's offline API and print JSON.

Runs inside the vLLM virtual environment made by `benchmarks/setup_vllm_cpu.sh`
and imports nothing from this project but the stdlib-only `harness.py` beside it. `benchmarks/engine_throughput.py --modes
vllm` starts it as a subprocess:

    .venv-vllm/bin/python benchmarks/vllm_runner.py --model CKPT_DIR \
        --workload workload.json [--out result.json]

The workload file is a JSON list of {"prompt_token_ids": [...], "max_tokens": n}.
Every request arrives when `LLM.generate()` is called; TTFT is measured from
that moment to the request's first output token (vLLM's per-request
`RequestStateStats`: arrival_time + first_token_latency), the same definition
the engine benchmark uses. Greedy, ignore_eos, so output lengths are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from harness import percentile  # standard library only, beside this script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--workload", required=True, help="workload JSON file")
    p.add_argument("--out", help="write the result JSON here (also printed)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile")
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    with open(args.workload) as f:
        workload = json.load(f)

    t_load = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype="float32",
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,  # random prompts share nothing; same as the engine run
        enforce_eager=args.enforce_eager,
        disable_log_stats=False,  # fills RequestOutput.metrics (per-request TTFT)
        seed=0,
    )
    load_s = time.perf_counter() - t_load

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in workload]
    sps = [params(int(r["max_tokens"])) for r in workload]

    # Warm-up, not timed.
    llm.generate([{"prompt_token_ids": [5] * 32}] * 2, params(4), use_tqdm=False)

    t0_wall = time.time()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    wall_s = time.perf_counter() - t0

    counts, ttfts, token_ids = [], [], []
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        counts.append(len(ids))
        token_ids.append(ids)
        m = o.metrics
        if m is not None and getattr(m, "first_token_latency", 0.0) > 0:
            ttfts.append(m.arrival_time + m.first_token_latency - t0_wall)
    out_tokens = sum(counts)
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in workload)
    result = {
        "mode": "vllm",
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "load_s": load_s,
        "num_requests": len(workload),
        "wall_s": wall_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall_s,
        "total_tok_s": (out_tokens + prompt_tokens) / wall_s,
        "req_s": len(workload) / wall_s,
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else float("nan"),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_count": len(ttfts),
        "output_len_mismatches": sum(
            1 for r, n in zip(workload, counts, strict=True) if n != int(r["max_tokens"])
        ),
        "enforce_eager": args.enforce_eager,
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k == "LD_PRELOAD"},
        "token_ids": token_ids,
    }
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print("VLLM_RESULT_JSON " + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
