"""Routing benchmark: the Mooncake conversation trace, round_robin vs prefix_aware.

Two parts (``/work/shared/data/mooncake_conversation_trace.jsonl``, token ids synthesised
per hash id, lengths scaled by ``tokens_per_hash / 512``):

``simulate`` — SIMULATION of the whole trace (12,031 requests): the router's real policies,
KV index and event codec over simulated per-instance LRU prefix caches
(``benchmarks/routing_sim.py``). Prints the prefix hit ratio of each policy against one
engine holding all the instances' cache, and simulated TTFT.

``real`` — real engines: N ``benchmarks/routing_worker.py`` processes (``LLMEngine`` with
the ``bench`` preset, KV events over ZMQ) behind a real ``kvrouter`` subprocess, per
policy, fresh engines each time. Replays multi-turn conversations of the trace (each
conversation's turns in order, ``--concurrency`` conversations at once) and measures TTFT
(time to the first streamed event) and the engines' own cached-token counts.

    python benchmarks/routing.py simulate --json bench-results/routing_sim.json
    python benchmarks/routing.py real --engines 2 --single --json bench-results/routing_real.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import Child, free_port, percentile  # noqa: E402
from routing_sim import TraceRequest, load_trace, simulate, single_engine_hit_ratio  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "mooncake_conversation_trace.jsonl"
STARTUP_S = 180.0


def run_simulation(a: argparse.Namespace) -> dict:
    reqs = load_trace(a.trace, a.tokens_per_hash, a.block_size, a.limit)
    single = single_engine_hit_ratio(reqs, a.instances * a.capacity, a.block_size)
    rows = {}
    for pol in ("round_robin", "least_load", "prefix_aware"):
        r = simulate(
            reqs, pol, a.instances, a.capacity, a.block_size, a.prefill_ms_per_token, a.tpot_ms
        )
        rows[pol] = asdict(r) | {"vs_single": r.hit_ratio / single}
    print(
        f"SIMULATION: {len(reqs)} requests, {a.instances} instances x {a.capacity} blocks of "
        f"{a.block_size} tokens, {a.tokens_per_hash} tokens per trace hash id"
    )
    print(
        f"{'policy':<14}{'hit ratio':>10}{'vs single':>11}{'TTFT p50':>10}{'p90':>8}{'p99':>8}  requests/instance"
    )
    print(f"{'single engine':<14}{single:>10.3f}{1.0:>11.2f}")
    for pol, r in rows.items():
        print(
            f"{pol:<14}{r['hit_ratio']:>10.3f}{r['vs_single']:>11.2f}{r['ttft_p50_s']:>10.3f}"
            f"{r['ttft_p90_s']:>8.3f}{r['ttft_p99_s']:>8.3f}  {r['per_instance_requests']}"
        )
    return {
        "mode": "simulation",
        "requests": len(reqs),
        "single_hit_ratio": single,
        "policies": rows,
        "params": {k: str(v) for k, v in vars(a).items() if k != "func"},
    }


def conversations(
    reqs: list[TraceRequest], rows: list[dict], n: int, min_turns: int, max_hash_ids: int
) -> list[list[TraceRequest]]:
    """The first ``n`` conversations (requests sharing their first two hash ids) with at
    least ``min_turns`` turns, each no longer than ``max_hash_ids`` hash ids."""
    groups: OrderedDict[tuple, list[int]] = OrderedDict()
    for i, row in enumerate(rows):
        if len(row["hash_ids"]) >= 2:
            groups.setdefault(tuple(row["hash_ids"][:2]), []).append(i)
    out = []
    for idx in groups.values():
        turns = idx[: min_turns + 1]
        if len(turns) >= min_turns and all(len(rows[i]["hash_ids"]) <= max_hash_ids for i in turns):
            out.append([reqs[i] for i in turns])
        if len(out) == n:
            break
    return out


async def one_request(
    session, url: str, req: TraceRequest, max_tokens: int
) -> tuple[float, int, int]:
    """(TTFT seconds, prompt tokens, cached tokens) of one streamed completion."""
    body = {"prompt": req.token_ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    t0 = time.perf_counter()
    ttft, last = None, None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            last = json.loads(line[6:])
    usage = last["usage"]
    return ttft, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


async def replay(
    url: str, convs: list[list[TraceRequest]], concurrency: int, max_tokens: int
) -> list[tuple]:
    import aiohttp

    sem, results = asyncio.Semaphore(concurrency), []

    async def conversation(turns: list[TraceRequest]) -> None:
        async with sem:
            for req in turns:
                results.append(await one_request(session, url, req, max_tokens))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(conversation(c) for c in convs))
    return results


def run_policy(
    a: argparse.Namespace, policy: str, engines: int, kv_mem: str, convs, logs: Path
) -> dict:
    procs: list[Child] = []
    urls, events = [], []
    env = {"PYTHONPATH": str(ROOT)}
    try:
        for i in range(engines):
            port, zport = free_port(), free_port()
            cmd = [
                sys.executable,
                str(ROOT / "benchmarks" / "routing_worker.py"),
                "--port",
                str(port),
                "--kv-events",
                f"tcp://*:{zport}",
                "--model",
                a.model,
                "--kv-cache-memory",
                kv_mem,
            ]
            procs.append(Child(cmd, log=logs / f"{policy}-w{i}.log", env=env))
            urls.append(f"http://127.0.0.1:{port}")
            events.append(f"tcp://127.0.0.1:{zport}")
        for url, p in zip(urls, procs, strict=True):
            p.wait_for_http(url + "/health", STARTUP_S)
        rport = free_port()
        cmd = [
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--port",
            str(rport),
            "--policy",
            policy,
            "--backend",
            *urls,
            "--kv-events",
            *events,
            "--model-block-size",
            str(a.block_size),
            "--load-alpha",
            str(a.load_alpha),
            "--load-cap",
            str(a.load_cap),
        ]
        procs.append(Child(cmd, log=logs / f"{policy}-router.log", env=env))
        router = f"http://127.0.0.1:{rport}"
        procs[-1].wait_for_http(router + "/health", STARTUP_S)
        warm = [TraceRequest(0, [7 + i] * 64, 1, []) for i in range(engines)]
        for url, w in zip(urls, warm, strict=True):  # first-call costs out of the figures
            asyncio.run(replay(url, [[w]], 1, 1))
        t0 = time.perf_counter()
        res = asyncio.run(replay(router, convs, a.concurrency, a.max_tokens))
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.stop()
    ttfts = [r[0] for r in res]
    prompt, cached = sum(r[1] for r in res), sum(r[2] for r in res)
    if a.verbose:
        for r in res:
            print(f"  {policy}: ttft {r[0]:.3f}s prompt {r[1]} cached {r[2]}")
    return {
        "policy": policy,
        "engines": engines,
        "requests": len(res),
        "wall_s": wall,
        "hit_ratio": cached / prompt,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
    }


def run_real(a: argparse.Namespace) -> dict:
    rows = [json.loads(line) for line in open(a.trace)]
    reqs = load_trace(a.trace, a.tokens_per_hash, a.block_size)
    convs = conversations(reqs, rows, a.conversations, a.min_turns, a.max_hash_ids)
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    out = {}
    plan = [
        ("round_robin", a.engines, a.kv_cache_memory),
        ("prefix_aware", a.engines, a.kv_cache_memory),
    ]
    if a.single:
        plan.append(("single", 1, a.single_kv_cache_memory))
    for name, n, mem in plan:
        out[name] = run_policy(a, "round_robin" if name == "single" else name, n, mem, convs, logs)
        out[name]["policy"] = name
    n_req = sum(len(c) for c in convs)
    print(
        f"REAL ENGINES: {a.engines} x {a.model} (kv {a.kv_cache_memory} each), {len(convs)} conversations, "
        f"{n_req} requests, concurrency {a.concurrency}, {a.tokens_per_hash} tokens per hash id"
    )
    print(f"{'policy':<14}{'hit ratio':>10}{'TTFT p50':>10}{'p90':>8}{'p99':>8}{'wall s':>8}")
    for name, r in out.items():
        print(
            f"{name:<14}{r['hit_ratio']:>10.3f}{r['ttft_p50_s']:>10.3f}{r['ttft_p90_s']:>8.3f}"
            f"{r['ttft_p99_s']:>8.3f}{r['wall_s']:>8.1f}"
        )
    ratio = out["round_robin"]["ttft_p50_s"] / out["prefix_aware"]["ttft_p50_s"]
    print(f"round_robin TTFT p50 / prefix_aware TTFT p50 = {ratio:.2f}")
    return {
        "mode": "real",
        "runs": out,
        "ttft_p50_ratio": ratio,
        "params": {k: str(v) for k, v in vars(a).items() if k != "func"},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(required=True)
    for name, func in (("simulate", run_simulation), ("real", run_real)):
        s = sub.add_parser(name)
        s.set_defaults(func=func)
        s.add_argument("--trace", type=Path, default=TRACE)
        s.add_argument("--block-size", type=int, default=16)
        s.add_argument("--tokens-per-hash", type=int, default=16)
        s.add_argument("--json", type=Path)
    sim, real = sub.choices["simulate"], sub.choices["real"]
    sim.add_argument("--instances", type=int, default=4)
    sim.add_argument("--capacity", type=int, default=5000, help="blocks per instance")
    sim.add_argument("--limit", type=int, help="only the first N requests")
    sim.add_argument("--prefill-ms-per-token", type=float, default=0.5)
    sim.add_argument("--tpot-ms", type=float, default=20.0)
    real.add_argument("--engines", type=int, default=2)
    real.add_argument("--model", default="bench")
    real.add_argument("--kv-cache-memory", default="256MiB")
    real.add_argument("--conversations", type=int, default=10)
    real.add_argument("--min-turns", type=int, default=3)
    real.add_argument("--max-hash-ids", type=int, default=48)
    real.add_argument("--concurrency", type=int, default=2)
    real.add_argument("--max-tokens", type=int, default=4)
    real.add_argument(
        "--single", action="store_true", help="also run one engine with every conversation"
    )
    real.add_argument(
        "--single-kv-cache-memory", default="512MiB", help="its cache: all the engines' together"
    )
    real.add_argument("--load-alpha", type=float, default=32.0, help="kvrouter --load-alpha")
    real.add_argument("--load-cap", type=int, default=4, help="kvrouter --load-cap")
    real.add_argument("--verbose", action="store_true", help="print every request")
    real.add_argument("--logs", default="/tmp/routing-bench-logs")
    a = p.parse_args()
    result = a.func(a)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
