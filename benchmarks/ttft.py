"""TTFT cold vs warm through the tiered connector, per tier, against the load limit.

    python benchmarks/ttft.py [--lengths 1024,4096,8192] [--tiers cpu,disk,redis]
        [--device cpu|cuda] [--redis-url URL] [--disk-path DIR] [--json bench-results/ttft.json]

Model: the ``bench`` preset (12 layers, 4 KV heads x 64, float32: 24 KiB of KV per
token), on ``--device`` (cpu by default; cuda runs the engine and its paged cache on the
GPU, loads then copy from pinned staging on a side stream). Each prompt is random
token ids from a fixed seed per length.

Per length:
  off     the engine without a connector (``kv_connector="none"``), a cold prompt:
          the baseline the connector must not slow down.
  cold    connector on, the store empty for this prompt (nothing to hit; the prompt's
          chunks are staged and saved as it runs).
  warm    the same prompt again, its whole chunks loaded from the tier (the engine's
          own prefix cache is off, so every hit comes from the store); best of
          ``--repeats``. The last ``len % chunk`` tokens (at least one) still compute.
  limit   the load alone at the tier's measured get bandwidth (``store.bench``, chunks
          of the same size as here) plus one decode step: loaded bytes / GB/s + step.

Connector overhead (``--overhead-pairs``, per tier): the same engine with the connector
off and on, both loaded, alternating, each pair on fresh prompts (a new seed: nothing
to hit, every chunk saved). TTFT pairs at ``--overhead-lengths``, and throughput pairs
of a small batch (``--overhead-batch`` requests, prompts 128-1024 tokens, 32 output
tokens each). Reported: the median of the per-pair ratios on / off (single long
prefills on this VM vary by ~10% run to run; pairs taken back to back see the same
machine).

TTFT is ``RequestMetrics.ttft`` (arrival to first token) of a single request. The
redis tier needs a server: ``--redis-url``, or a private ``redis-server`` is started
when the binary is installed (otherwise the tier is skipped with a note).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Child, start_redis  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.presets import PRESETS  # noqa: E402
from store.bench import bench_config, bench_tier  # noqa: E402
from store.config import from_flat  # noqa: E402

MODEL = "bench"
CHUNK = 256


def prompt(length: int, seed: int | None = None) -> list[int]:
    rng = random.Random(length if seed is None else f"{length}-{seed}")
    return [rng.randrange(3, PRESETS[MODEL].vocab_size) for _ in range(length)]


def kv_bytes_per_token(model: str, device: str) -> int:
    """KV bytes per token of ``model`` in the dtype the engine runs it in on ``device``."""
    mc = PRESETS[model]
    dtype = EngineConfig(model=model, device=device).torch_dtype(
        mc.torch_dtype, torch.device(device)
    )
    return mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * dtype.itemsize


def ttft(llm: LLM, ids: list[int], max_tokens: int = 1) -> tuple[float, float | None, dict]:
    """(TTFT s, the following decode step s or None, kv_sources) of one request."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out = llm.generate([ids], params)[0]
    m = out.metrics
    step = (m.finished_time - m.first_token_time) if max_tokens == 2 else None
    return m.ttft, step, dict(m.kv_sources)


def store_flat(tier: str, args: argparse.Namespace, need: int) -> dict:
    flat = {"tiers": [tier], "chunk_size": CHUNK, "cpu.size": max(need, 2**28)}
    if tier == "disk":
        flat.update({"disk.path": args.disk_path, "disk.size": 2 * need, "disk.fsync": False})
    if tier == "redis":
        flat["redis.url"] = args.redis_url
    return flat


def tier_get_gbps(tier: str, flat: dict, chunk_bytes: int) -> float:
    """The tier's get bandwidth for chunks of ``chunk_bytes`` (``kvstore bench``'s method)."""
    cfg = bench_config(tier, chunk_bytes, from_flat(flat), total=32 * chunk_bytes)
    return bench_tier(tier, chunk_bytes, cfg, total=32 * chunk_bytes).get


def private_redis(workdir: str) -> tuple[Child | None, str | None]:
    """A private ``redis-server`` (no memory limit) and its URL; (None, None) without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    proc, port = start_redis(binary, workdir, "--maxmemory", "0")
    return proc, f"redis://127.0.0.1:{port}/0"


def engine_kwargs(max_len: int, device: str) -> dict:
    return dict(
        enable_prefix_caching=False,
        kv_cache_memory="1GiB",
        max_num_seqs=4,
        max_num_batched_tokens=2048,
        max_model_len=max_len + 16,
        device=device,
    )


def run(args: argparse.Namespace) -> dict:
    lengths = [int(x) for x in args.lengths.split(",")]
    tiers = [t for t in args.tiers.split(",") if t]
    per_token = kv_bytes_per_token(MODEL, args.device)
    need = per_token * max(lengths) * 2
    kw = engine_kwargs(max(lengths), args.device)
    results: dict = {
        "model": MODEL,
        "device": args.device,
        "chunk_size": CHUNK,
        "kv_bytes_per_token": per_token,
        "lengths": lengths,
        "off": {},
        "tiers": {},
    }
    off = LLM(MODEL, **kw)
    ttft(off, prompt(64))  # warm-up: first-call allocations
    for n in lengths:
        results["off"][n] = ttft(off, prompt(n))[0]
        print(f"off     {n:>6} tokens  ttft {results['off'][n]:.3f}s", flush=True)
    for tier in tiers:
        if tier == "redis" and args.redis_url is None:
            print("redis: no --redis-url and no redis-server binary; skipped")
            continue
        flat = store_flat(tier, args, need)
        gbps = tier_get_gbps(tier, flat, CHUNK * per_token)
        llm = LLM(MODEL, kv_connector="tiered", kv_config=flat, **kw)
        ttft(llm, prompt(64))
        rows = {}
        for n in lengths:
            ids = prompt(n)
            cold = ttft(llm, ids)[0]
            llm.engine.connector.flush()
            warm, steps, srcs = [], [], {}
            for _ in range(args.repeats):
                t, step, srcs = ttft(llm, ids, max_tokens=2)
                warm.append(t)
                steps.append(step)
            loaded = srcs.get(tier, 0)
            limit = loaded * per_token / (gbps * 1e9) + min(steps)
            rows[n] = {
                "cold": cold,
                "warm": min(warm),
                "decode_step": min(steps),
                "loaded_tokens": loaded,
                "load_limit": limit,
                "get_gbps": gbps,
            }
            print(
                f"{tier:<7} {n:>6} tokens  cold {cold:.3f}s  warm {min(warm):.3f}s  "
                f"limit {limit:.3f}s  ({loaded} tokens loaded at {gbps:.2f} GB/s)",
                flush=True,
            )
        results["tiers"][tier] = rows
        if args.overhead_pairs:
            results.setdefault("overhead", {})[tier] = overhead(args, off, llm)
        llm.close()
    return results


def batch_tok_s(llm: LLM, seed: int, count: int) -> float:
    """Output tokens/s of ``count`` fresh requests (prompts 128-1024, 32 tokens out)."""
    rng = random.Random(seed)
    ids = [prompt(rng.randrange(128, 1025), seed * 1000 + i) for i in range(count)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(ids, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def overhead(args: argparse.Namespace, off: LLM, on: LLM) -> dict:
    """Connector on (nothing to hit) over off: median per-pair ratios, fresh prompts."""
    lengths = [int(x) for x in args.overhead_lengths.split(",") if x]
    out: dict = {"pairs": args.overhead_pairs, "ttft": {}, "throughput": {}}
    seed = 0

    def pairs(measure) -> list[float]:
        nonlocal seed
        ratios = []
        for i in range(args.overhead_pairs):
            seed += 1
            first, second = (off, on) if i % 2 == 0 else (on, off)
            a, b = measure(first, seed), measure(second, seed + 10_000)
            on_v, off_v = (b, a) if first is off else (a, b)
            ratios.append(on_v / off_v)
            on.engine.connector.flush()
        return sorted(ratios)

    for n in lengths:
        r = pairs(lambda llm, sd, n=n: ttft(llm, prompt(n, sd))[0])
        out["ttft"][n] = {"median": r[len(r) // 2], "ratios": r}
        print(
            f"overhead ttft {n:>6} tokens: on/off median {r[len(r) // 2]:.3f} "
            f"({', '.join(f'{x:.3f}' for x in r)})",
            flush=True,
        )
    r = pairs(lambda llm, sd: 1.0 / batch_tok_s(llm, sd, args.overhead_batch))
    out["throughput"] = {"median": 1.0 / r[len(r) // 2], "ratios": [1.0 / x for x in r]}
    print(
        f"overhead throughput ({args.overhead_batch} requests): on/off median "
        f"{out['throughput']['median']:.3f}",
        flush=True,
    )
    return out


def table(res: dict) -> str:
    lines = [
        f"{'tier':<6} {'tokens':>6} {'off s':>8} {'cold s':>8} {'warm s':>8} "
        f"{'cold/warm':>9} {'limit s':>8} {'warm/limit':>10} {'on/off':>7}"
    ]
    for tier, rows in res["tiers"].items():
        for n, r in rows.items():
            off = res["off"][n]
            lines.append(
                f"{tier:<6} {n:>6} {off:>8.3f} {r['cold']:>8.3f} {r['warm']:>8.3f} "
                f"{r['cold'] / r['warm']:>8.1f}x {r['load_limit']:>8.3f} "
                f"{r['warm'] / r['load_limit']:>9.2f}x {r['cold'] / off:>6.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--tiers", default="cpu,disk,redis")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--disk-path", default=None)
    p.add_argument("--overhead-pairs", type=int, default=4, help="0: skip the overhead pairs")
    p.add_argument("--overhead-lengths", default="1024,4096")
    p.add_argument("--overhead-batch", type=int, default=8)
    p.add_argument("--json", default="bench-results/ttft.json")
    args = p.parse_args()
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="ttft-disk-")
    redis_dir = tempfile.TemporaryDirectory(prefix="ttft-redis-")
    if "redis" in args.tiers and args.redis_url is None:
        proc, args.redis_url = private_redis(redis_dir.name)
    args.disk_path = args.disk_path or tmp.name
    try:
        res = run(args)
    finally:
        if proc is not None:
            proc.stop()
        tmp.cleanup()
        redis_dir.cleanup()
    print(table(res))
    for tier, o in res.get("overhead", {}).items():
        cells = ", ".join(f"TTFT {n}: {v['median']:.3f}" for n, v in o["ttft"].items())
        print(
            f"connector on / off, nothing to hit, {tier}: {cells}, "
            f"throughput {o['throughput']['median']:.3f} (median of {o['pairs']} pairs)"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
