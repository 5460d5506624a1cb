"""Disaggregated prefill/decode benchmark: colocated (one engine) versus 1P1D.

Real processes on localhost, the ``bench`` preset (``--model``): a ``kvstore serve``
daemon; ``engine serve`` colocated (no connector); then a producer (``--kv-role
producer --kvstore``) and a consumer (``--kv-role consumer --kvstore``) behind
``kvrouter serve --prefill P --decode D``. Both setups get the same mixed load: long
prompts with short answers interleaved with short prompts with long answers, sent at a
fixed interval (``--interval``), all streamed. Per request: TTFT (to the first streamed
token) and inter-token latency ((last - first token time) / (tokens - 1)); per setup
p50/p90 of each, split by kind.

KV transfer: the bytes the decode node loaded from the daemon (its ``kv`` block) and,
measured in the same run on the same daemon, the client's put and get GB/s for chunks
of the model's real chunk size, against a raw TCP socket stream moving the same bytes
(``store/daemon/bench.py``'s ``RawPeer``).

    python benchmarks/disagg.py --json bench-results/disagg.json

On a 2-core machine the three engines share the cores, so 1P1D cannot show the speedup
separate GPUs give; what it shows is where the time goes (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import (  # noqa: E402
    DAEMON_READY,
    ENGINE_READY,
    Child,
    free_port,
    metric_sum,
    percentile,
    scrape_metrics,
)

STARTUP_S = 300


def start(argv: list[str], log: Path, threads: int | None = None) -> Child:
    env = {"PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads
    return Child(argv, log=log, env=env)


def engine(
    model: str, port: int, logdir: Path, name: str, *extra: str, threads: int | None = None
) -> Child:
    argv = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--port", str(port)]
    p = start([*argv, *extra], logdir / f"{name}.log", threads)
    p.wait_for_line(ENGINE_READY, STARTUP_S, name)
    return p


def workload(
    n: int,
    long_prompt: int,
    long_out: int,
    short_prompt: int,
    short_out: int,
    vocab: int,
    seed: int = 0,
) -> list[dict]:
    """``n`` requests alternating long-prompt/short-answer and short-prompt/long-answer."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        kind = "long_prompt" if i % 2 == 0 else "long_decode"
        plen, out = (long_prompt, long_out) if kind == "long_prompt" else (short_prompt, short_out)
        reqs.append(
            {
                "kind": kind,
                "prompt": [rng.randrange(100, vocab) for _ in range(plen)],
                "max_tokens": out,
            }
        )
    return reqs


async def one(session, url: str, model: str, req: dict, delay: float) -> dict:
    await asyncio.sleep(delay)
    body = {
        "model": model,
        "prompt": req["prompt"],
        "max_tokens": req["max_tokens"],
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last_t = None
    usage, kv = None, {}
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                raise RuntimeError(msg["error"])
            if msg.get("choices"):
                now = time.perf_counter()
                first = first if first is not None else now
                last_t = now
            if msg.get("usage"):
                usage, kv = msg["usage"], msg.get("kv", {})
    n = usage["completion_tokens"]
    return {
        "kind": req["kind"],
        "ttft": first - t0,
        "itl": (last_t - first) / (n - 1) if n > 1 else None,
        "e2e": last_t - t0,
        "tokens": n,
        "loaded": kv.get("sources", {}).get("remote", 0),
    }


async def drive(url: str, model: str, reqs: list[dict], interval: float) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
        return await asyncio.gather(
            *(one(s, url, model, r, i * interval) for i, r in enumerate(reqs))
        )


def summarize(results: list[dict]) -> dict:
    out = {}
    for kind in ("all", "long_prompt", "long_decode"):
        rs = [r for r in results if kind == "all" or r["kind"] == kind]
        ttft = [r["ttft"] for r in rs]
        itl = [r["itl"] for r in rs if r["itl"] is not None]
        out[kind] = {
            "n": len(rs),
            "ttft_p50": percentile(ttft, 50),
            "ttft_p90": percentile(ttft, 90),
            "itl_p50": percentile(itl, 50, empty=None),
            "itl_p90": percentile(itl, 90, empty=None),
        }
    out["loaded_tokens"] = sum(r["loaded"] for r in results)
    out["wall_s"] = max(r["e2e"] + 0 for r in results)
    return out


def warm(url: str, model: str) -> None:
    asyncio.run(drive(url, model, [{"kind": "warm", "prompt": [5] * 300, "max_tokens": 4}], 0))


def daemon_transfers(metrics_port: int) -> dict:
    """The daemon's payload bytes in/out and its time serving puts/gets (Prometheus)."""
    samples = scrape_metrics(f"http://127.0.0.1:{metrics_port}")
    moved = "kvstore_daemon_payload_bytes_total"
    served = "kvstore_daemon_request_seconds_sum"
    return {
        "bytes_in": metric_sum(samples, moved, direction="in"),
        "bytes_out": metric_sum(samples, moved, direction="out"),
        "put_s": metric_sum(samples, served, method="Put"),
        "get_s": metric_sum(samples, served, method="Get"),
    }


def transport_bench(url: str, chunk_bytes: int, chunks: int, repeats: int = 3) -> dict:
    """GB/s of the daemon client's put/get of ``chunks`` chunks of ``chunk_bytes`` (the
    engines' chunk size) over the socket stream and shared memory, against a raw socket
    stream of the same bytes."""
    import hashlib

    import numpy as np

    from kvcore.chunk import make_chunk
    from store.client import KVStoreClient
    from store.daemon.bench import RawPeer

    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, chunk_bytes, dtype=np.uint8) for _ in range(chunks)]
    outs = [np.empty(chunk_bytes, dtype=np.uint8) for _ in range(chunks)]
    keys = [
        hashlib.sha256(f"disagg-bench-{os.getpid()}-{i}".encode()).hexdigest()
        for i in range(chunks)
    ]
    cs = [make_chunk(k, b"\0" * 32, d, 1) for k, d in zip(keys, data, strict=True)]
    peer, best = RawPeer(), {}
    total = chunk_bytes * chunks

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t)

    with KVStoreClient(url) as client:
        try:
            for _ in range(repeats):
                timed("raw_put", lambda: peer.put(data))
                timed("raw_get", lambda: peer.get(outs))
                for t in ("stream", "shm"):
                    client.delete(keys)
                    timed(f"{t}_put", lambda t=t: client.put(cs, transport=t))
                    timed(f"{t}_get", lambda t=t: client.get(keys, outs, transport=t))
        finally:
            client.delete(keys)
            peer.close()
    return {k: total / v / 1e9 for k, v in best.items()} | {"bytes": total}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="bench")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--long-prompt", type=int, default=1536)
    ap.add_argument("--long-out", type=int, default=8)
    ap.add_argument("--short-prompt", type=int, default=64)
    ap.add_argument("--short-out", type=int, default=96)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between arrivals")
    ap.add_argument("--cpu-size", default="2GiB", help="the daemon's cpu tier")
    ap.add_argument(
        "--pd-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads of the prefill and of the decode engine (the colocated "
        "engine keeps torch's default: every core); default: half the cores each",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--logdir", type=Path, default=ROOT / "bench-results" / "disagg-logs")
    a = ap.parse_args()
    a.logdir.mkdir(parents=True, exist_ok=True)

    from engine.loader import open_model
    from store.config import StoreConfig

    mc = open_model(a.model).config
    chunk_tokens = StoreConfig.load().chunk_size
    bytes_per_token = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * 4  # float32 on CPU
    reqs = workload(
        a.requests, a.long_prompt, a.long_out, a.short_prompt, a.short_out, mc.vocab_size
    )
    results, procs = {}, []
    try:
        p = engine(a.model, free_port(), a.logdir, "colocated")
        procs.append(p)
        url = f"http://127.0.0.1:{p.args[p.args.index('--port') + 1]}"
        warm(url, a.model)
        t = time.perf_counter()
        results["colocated"] = summarize(asyncio.run(drive(url, a.model, reqs, a.interval)))
        results["colocated"]["wall_s"] = time.perf_counter() - t
        p.stop()
        procs.remove(p)

        serve = [sys.executable, "-m", "store.cli", "serve", "--port", "0", "--metrics-port", "0"]
        d = start([*serve, "--cpu-size", a.cpu_size], a.logdir / "daemon.log")
        procs.append(d)
        ready = d.wait_for_line(DAEMON_READY, STARTUP_S, "kvstore serve")
        kv_url, metrics_port = f"kvstore://127.0.0.1:{ready.group(2)}", int(ready.group(4))
        pp, dp, rp = free_port(), free_port(), free_port()
        procs.append(
            engine(
                a.model,
                pp,
                a.logdir,
                "producer",
                "--kvstore",
                kv_url,
                "--kv-role",
                "producer",
                threads=a.pd_threads,
            )
        )
        procs.append(
            engine(
                a.model,
                dp,
                a.logdir,
                "consumer",
                "--kvstore",
                kv_url,
                "--kv-role",
                "consumer",
                threads=a.pd_threads,
            )
        )
        route = ["--prefill", f"http://127.0.0.1:{pp}", "--decode", f"http://127.0.0.1:{dp}"]
        r = start(
            [sys.executable, "-m", "router.cli", "serve", "--port", str(rp), *route],
            a.logdir / "router.log",
        )
        procs.append(r)
        url = f"http://127.0.0.1:{rp}"
        deadline = time.monotonic() + 60
        while True:  # the router's health checks must see both engines
            try:
                warm(url, a.model)
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        t = time.perf_counter()
        results["1p1d"] = summarize(asyncio.run(drive(url, a.model, reqs, a.interval)))
        results["1p1d"]["wall_s"] = time.perf_counter() - t
        results["engine_path"] = daemon_transfers(metrics_port)
        n_chunks = max(1, a.long_prompt // chunk_tokens)
        results["transport"] = transport_bench(kv_url, chunk_tokens * bytes_per_token, n_chunks)
    finally:
        for p in reversed(procs):
            p.stop()

    co, pd, tr = results["colocated"], results["1p1d"], results["transport"]
    results["config"] = {k: v for k, v in vars(a).items() if k not in ("json", "logdir")} | {
        "chunk_tokens": chunk_tokens,
        "chunk_bytes": chunk_tokens * bytes_per_token,
        "cores": os.cpu_count(),
    }
    results["kv_loaded_bytes"] = pd["loaded_tokens"] * bytes_per_token
    print(
        f"{a.requests} requests ({a.long_prompt}-token prompts x {a.long_out} tokens, "
        f"{a.short_prompt}-token prompts x {a.short_out} tokens, one every {a.interval}s), "
        f"model {a.model}, {os.cpu_count()} cores"
    )
    print(f"{'metric':<28}{'colocated':>11}{'1P1D':>11}{'1P1D/colo':>11}")

    def row(name: str, kind: str, key: str, scale: float = 1000.0) -> None:
        x, y = co[kind][key], pd[kind][key]
        if x is None or y is None:
            return
        print(f"{name:<28}{x * scale:>10.1f}{'':1}{y * scale:>10.1f}{'':1}{y / x:>10.2f}x")

    for kind in ("all", "long_prompt", "long_decode"):
        row(f"TTFT p50 ms ({kind})", kind, "ttft_p50")
        row(f"TTFT p90 ms ({kind})", kind, "ttft_p90")
        row(f"ITL p50 ms ({kind})", kind, "itl_p50")
        row(f"ITL p90 ms ({kind})", kind, "itl_p90")
    print(
        f"{'wall s':<28}{co['wall_s']:>10.1f} {pd['wall_s']:>10.1f} {pd['wall_s'] / co['wall_s']:>10.2f}x"
    )
    print(
        f"decode node loaded {pd['loaded_tokens']} prompt tokens from the daemon "
        f"({results['kv_loaded_bytes'] / 1e6:.0f} MB)"
    )
    ep = results["engine_path"]
    ep_put = ep["bytes_in"] / ep["put_s"] / 1e9 if ep["put_s"] else float("nan")
    ep_get = ep["bytes_out"] / ep["get_s"] / 1e9 if ep["get_s"] else float("nan")
    results["engine_path"] |= {"put_gbps": ep_put, "get_gbps": ep_get}
    print(
        f"1P1D run, daemon side: {ep['bytes_in'] / 1e6:.0f} MB saved in {ep['put_s']:.3f} s of puts "
        f"= {ep_put:.2f} GB/s ({ep_put / tr['raw_put']:.2f}x raw socket), {ep['bytes_out'] / 1e6:.0f} MB "
        f"loaded in {ep['get_s']:.3f} s of gets = {ep_get:.2f} GB/s ({ep_get / tr['raw_get']:.2f}x raw)"
    )
    print(
        f"transport, same daemon, {tr['bytes'] / 1e6:.0f} MB in {chunk_tokens * bytes_per_token / 1e6:.1f} MB "
        f"chunks (GB/s; ratio to the raw socket stream):"
    )
    for op in ("put", "get"):
        raw = tr[f"raw_{op}"]
        print(
            f"  {op}: raw socket {raw:.2f}, stream {tr[f'stream_{op}']:.2f} "
            f"({tr[f'stream_{op}'] / raw:.2f}x), shm {tr[f'shm_{op}']:.2f} ({tr[f'shm_{op}'] / raw:.2f}x)"
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
