"""Load test of ``engine serve``: N concurrent streaming clients for a bounded time.

    python benchmarks/load_test.py [--model tiny|bench] [--clients 32] [--duration 180]
        [--max-requests 20000] [--warmup 30] [--disconnect-fraction 0.1]
        [--server-args "--kv-cache-memory 4MiB"] [--json bench-results/load_test.json]

Starts ``engine serve --model MODEL --port 0`` (a subprocess on loopback; its log goes
to a temporary file, printed on failure) and runs ``--clients`` concurrent clients, each
sending one streaming request after another until ``--duration`` seconds have passed or
``--max-requests`` requests have been sent in all (requests in flight then finish).

The mix (fixed seed per client):
  * endpoints: half ``/v1/completions``, half ``/v1/chat/completions``;
  * clients: every 4th uses the official ``openai.AsyncOpenAI`` client, the rest aiohttp
    with a hand-read SSE stream;
  * prompts: 60% start with one of 4 shared prefixes (256-768 tokens; the presets'
    tokenizers are byte-level, so a character is a token) plus a unique tail, 40% are
    unique (30-400 tokens); ``max_tokens`` from 8 to 256; temperature 0 or 0.8; 80% with
    ``ignore_eos`` (then exactly ``max_tokens`` tokens must come back);
  * ``--disconnect-fraction`` of requests close their connection on purpose after 0 (as
    soon as the response headers arrive) to ``max_tokens / 2`` chunks (the server must
    abort them and free their blocks; one that already finished is not an abort).

Every request asks for ``stream_options.include_usage``. An error is: a non-200 status,
an exception or timeout, a stream with an ``error`` event, or a stream (not one of the
deliberate disconnects) that ends without a ``finish_reason``, the usage chunk and
``[DONE]``, or with ``ignore_eos`` and a completion token count other than
``max_tokens``. Also: the server's ``engine_request_errors_total`` must not move, it
must count as many requests as were sent, its log must hold no traceback or error line,
and it must still answer ``/health`` and exit 0 on SIGTERM.

Sampled every ``--sample-interval`` seconds: the server's RSS (psutil, else
/proc/PID/status) and ``/metrics`` (running, waiting, free KV blocks). After the load
the test waits for the engine to go idle and checks ``engine_kv_blocks_free`` equals
``engine_kv_blocks_total`` (free counts cached blocks: held by no request).

Reported: requests completed, deliberate disconnects, errors, output tokens/s (usage
``completion_tokens`` of completed requests over the load phase), TTFT p50/p90/p99 (send
to the first chunk with text), inter-token latency p50/p90 (gaps between text chunks;
the server holds back an incomplete UTF-8 sequence, so a gap can span two tokens) and
time per output token ((last - first chunk) / (tokens - 1)), RSS at start / after
warm-up / end of load / after idle, its least-squares slope over the steady phase
(warm-up to end of load), free blocks before and after. Exit 1 on any error, leaked
blocks, or (with ``--max-rss-growth MiB``) steady-phase growth above it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from harness import ENGINE_READY, Child, metric_sum, parse_metrics, percentile, totals_by_name

WORDS = (
    "cache block token prefix engine server stream latency memory paged kernel "
    "request router tier disk redis layer attention decode prefill batch"
).split()
MAX_TOKENS = (8, 16, 32, 64, 64, 128, 128, 256)
REQUEST_TIMEOUT = 300.0


# -- the server ---------------------------------------------------------------------------
@dataclass
class Server:
    proc: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        return self.proc.output()[-n:]


def start_server(model: str, extra: list[str], timeout: float = 300) -> Server:
    """``engine serve --model MODEL --port 0 EXTRA``, its log in a temporary file."""
    fd, log_path = tempfile.mkstemp(prefix="engine-serve-", suffix=".log")
    os.close(fd)
    argv = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--port", "0", *extra]
    proc = Child(argv, log=log_path)
    return Server(proc, int(proc.wait_for_line(ENGINE_READY, timeout, "engine serve").group(2)))


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS") from None


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Sample name -> value summed over label sets; ``aborts``: requests finished as
    ``abort`` (``engine_requests_total{finish_reason="abort"}``)."""
    async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=30)) as r:
        samples = parse_metrics(await r.text())
    aborts = metric_sum(samples, "engine_requests_total", finish_reason="abort")
    return {**totals_by_name(samples), "aborts": aborts}


# -- the workload -------------------------------------------------------------------------
def words(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        w = f"{rng.choice(WORDS)}{rng.randrange(1000)}"
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


SHARED = [words(random.Random(1000 + i), n) for i, n in enumerate((256, 384, 512, 768))]


@dataclass
class Job:
    endpoint: str  # "completions" or "chat"
    prompt: str
    max_tokens: int
    temperature: float
    ignore_eos: bool
    disconnect_after: int | None  # close after this many chunks (deliberate; 0: at the headers)
    shared: bool


def make_job(rng: random.Random, disconnect_fraction: float) -> Job:
    shared = rng.random() < 0.6
    if shared:
        prompt = rng.choice(SHARED) + "\n" + words(rng, rng.randrange(20, 200))
    else:
        prompt = words(rng, rng.randrange(30, 400))
    max_tokens = rng.choice(MAX_TOKENS)
    disconnect = None
    if rng.random() < disconnect_fraction:
        disconnect = rng.randrange(0, max(2, max_tokens // 2))
    return Job(
        "chat" if rng.random() < 0.5 else "completions",
        prompt,
        max_tokens,
        rng.choice((0.0, 0.8)),
        rng.random() < 0.8,
        disconnect,
        shared,
    )


@dataclass
class Result:
    client: int
    kind: str  # aiohttp or openai
    endpoint: str
    start: float
    end: float = 0.0
    status: int = 0
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # [DONE] seen (aiohttp) / the stream ended normally (openai)
    disconnected: bool = False  # closed on purpose
    error: str | None = None


def _body(job: Job, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": job.max_tokens,
        "stream": True,
        "temperature": job.temperature,
        "ignore_eos": job.ignore_eos,
        "stream_options": {"include_usage": True},
    }
    if job.endpoint == "chat":
        body["messages"] = [
            {"role": "system", "content": "You are a load test."},
            {"role": "user", "content": job.prompt},
        ]
    else:
        body["prompt"] = job.prompt
    return body


def _take_chunk(res: Result, chunk: dict[str, Any], now: float, chat: bool) -> None:
    if chunk.get("error"):
        res.error = f"error event: {chunk['error']}"
        return
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        if text:
            if res.ttft is None:
                res.ttft = now - res.start
            res.chunk_times.append(now)
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        res.completion_tokens = usage.get("completion_tokens")
        res.prompt_tokens = usage.get("prompt_tokens")
        res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


async def run_aiohttp(
    session: aiohttp.ClientSession, url: str, model: str, job: Job, res: Result
) -> None:
    chat = job.endpoint == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    resp = await session.post(url + path, json=_body(job, model))
    try:
        res.status = resp.status
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            return
        chunks = 0
        if job.disconnect_after == 0:
            res.disconnected = True
            resp.close()
            return
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                res.done = True
                break
            chunks += 1
            _take_chunk(res, json.loads(data), time.monotonic(), chat)
            if res.error:
                return
            if job.disconnect_after is not None and chunks >= job.disconnect_after:
                res.disconnected = True
                resp.close()  # drops the connection, not back to the pool
                return
    finally:
        resp.release()


async def run_openai(client: Any, model: str, job: Job, res: Result) -> None:
    chat = job.endpoint == "chat"
    body = _body(job, model)
    extra = {"ignore_eos": body.pop("ignore_eos")}
    body.pop("stream")
    if chat:
        stream = await client.chat.completions.create(**body, stream=True, extra_body=extra)
    else:
        stream = await client.completions.create(**body, stream=True, extra_body=extra)
    res.status = 200
    chunks = 0
    try:
        if job.disconnect_after == 0:
            res.disconnected = True
            return
        async for chunk in stream:
            chunks += 1
            _take_chunk(res, chunk.model_dump(), time.monotonic(), chat)
            if res.error:
                return
            if job.disconnect_after is not None and chunks >= job.disconnect_after:
                res.disconnected = True
                return
        res.done = True
    finally:
        await stream.close()


def check(res: Result, job: Job) -> None:
    """Turn a stream that ended wrongly into an error (deliberate disconnects excepted)."""
    if res.error or res.disconnected:
        return
    if res.finish_reason is None:
        res.error = "stream ended without a finish_reason"
    elif res.completion_tokens is None:
        res.error = "stream ended without the usage chunk"
    elif not res.done:
        res.error = "stream ended without [DONE]"
    elif (
        job.ignore_eos and res.finish_reason == "length" and res.completion_tokens != job.max_tokens
    ):
        res.error = f"{res.completion_tokens} tokens, asked for {job.max_tokens}"
    elif job.ignore_eos and res.finish_reason != "length":
        res.error = f"finish_reason {res.finish_reason} with ignore_eos"


class Budget:
    def __init__(self, max_requests: int, deadline: float) -> None:
        self.left, self.deadline = max_requests, deadline

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() >= self.deadline:
            return False
        self.left -= 1
        return True


async def client_loop(
    i: int,
    url: str,
    model: str,
    budget: Budget,
    results: list[Result],
    disconnect_fraction: float,
    seed: int,
) -> None:
    rng = random.Random(seed * 1000 + i)
    kind = "openai" if i % 4 == 3 else "aiohttp"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    if kind == "openai":
        import openai

        oa = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT
        )
    session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=2))
    try:
        await asyncio.sleep(rng.random() * 2)  # stagger the start
        while budget.take():
            job = make_job(rng, disconnect_fraction)
            res = Result(i, kind, job.endpoint, time.monotonic())
            try:
                if kind == "openai":
                    await asyncio.wait_for(run_openai(oa, model, job, res), REQUEST_TIMEOUT)
                else:
                    await run_aiohttp(session, url, model, job, res)
                check(res, job)
            except Exception as e:  # noqa: BLE001 - every failure is a counted error
                status = getattr(e, "status_code", None)
                if status:
                    res.status = status
                res.error = f"{type(e).__name__}: {str(e)[:300]}"
            res.end = time.monotonic()
            results.append(res)
    finally:
        await session.close()
        if kind == "openai":
            await oa.close()


# -- the run ------------------------------------------------------------------------------
def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t, y)."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else None


async def wait_idle(session: aiohttp.ClientSession, url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(session, url)
        idle = m.get("engine_requests_running", 0) == 0 and m.get("engine_requests_waiting", 0) == 0
        if (idle and m.get("engine_kv_blocks_free") == m.get("engine_kv_blocks_total")) or (
            time.monotonic() > deadline
        ):
            return m
        await asyncio.sleep(0.25)


async def load(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    url, pid = server.url, server.proc.pid
    samples: list[dict[str, float]] = []
    results: list[Result] = []
    async with aiohttp.ClientSession() as session:
        before = await scrape(session, url)
        t0 = time.monotonic()
        rss_start = rss_bytes(pid)
        budget = Budget(args.max_requests, t0 + args.duration)
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                try:
                    m = await scrape(session, url)
                    samples.append(
                        {
                            "t": round(time.monotonic() - t0, 2),
                            "rss": rss_bytes(pid),
                            "running": m.get("engine_requests_running", 0),
                            "waiting": m.get("engine_requests_waiting", 0),
                            "free_blocks": m.get("engine_kv_blocks_free", 0),
                            "done": len(results),
                        }
                    )
                    if args.verbose:
                        s = samples[-1]
                        print(
                            f"  t={s['t']:6.1f}s rss={s['rss'] / 2**20:7.1f} MiB "
                            f"running={s['running']:.0f} waiting={s['waiting']:.0f} "
                            f"free={s['free_blocks']:.0f} done={s['done']}",
                            flush=True,
                        )
                except Exception as e:  # noqa: BLE001 - a missed sample is noted, not fatal
                    samples.append({"t": round(time.monotonic() - t0, 2), "error": repr(e)})
                try:
                    await asyncio.wait_for(stop.wait(), args.sample_interval)
                except TimeoutError:
                    pass

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(
            *(
                client_loop(
                    i, url, args.served_model, budget, results, args.disconnect_fraction, args.seed
                )
                for i in range(args.clients)
            )
        )
        t_end = time.monotonic()
        rss_end = rss_bytes(pid)
        stop.set()
        await sampling
        after = await wait_idle(session, url, 60)
        await asyncio.sleep(2)
        rss_idle = rss_bytes(pid)
        async with session.get(url + "/health") as r:
            health = r.status
    return {
        "before": before,
        "after": after,
        "t0": t0,
        "t_end": t_end,
        "samples": samples,
        "results": results,
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_idle": rss_idle,
        "health": health,
    }


def log_errors(log: str) -> list[str]:
    """Lines of the server's log that report an error (tracebacks, aiohttp's 500s)."""
    pattern = re.compile(r"Traceback \(most recent|Error handling request|\bERROR\b|Exception")
    return [line for line in log.splitlines() if pattern.search(line)]


def summarize(
    args: argparse.Namespace, run: dict[str, Any], exit_code: int, server_log: str
) -> dict[str, Any]:
    results: list[Result] = run["results"]
    t0, t_end = run["t0"], run["t_end"]
    wall = t_end - t0
    errors = [r for r in results if r.error]
    completed = [r for r in results if not r.error and not r.disconnected]
    disconnected = [r for r in results if r.disconnected and not r.error]
    tokens = sum(r.completion_tokens or 0 for r in completed)
    ttfts = [r.ttft for r in results if r.ttft is not None and not r.error]
    gaps = [
        b - a
        for r in results
        if not r.error
        for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)
    ]
    tpots = [
        (r.chunk_times[-1] - r.chunk_times[0]) / (r.completion_tokens - 1)
        for r in completed
        if r.completion_tokens and r.completion_tokens > 1 and len(r.chunk_times) > 1
    ]
    samples = [s for s in run["samples"] if "rss" in s]
    warm = [s for s in samples if s["t"] >= args.warmup]
    rss_warm = warm[0]["rss"] if warm else None
    steady = [(s["t"], s["rss"] / 2**20) for s in warm]
    rss_slope = slope(steady)  # MiB per second
    steady_s = (steady[-1][0] - steady[0][0]) if len(steady) > 1 else 0.0
    before, after = run["before"], run["after"]
    srv_errors = after.get("engine_request_errors_total", 0) - before.get(
        "engine_request_errors_total", 0
    )
    leaked = after.get("engine_kv_blocks_total", 0) - after.get("engine_kv_blocks_free", 0)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in completed)
    cached = sum(r.cached_tokens or 0 for r in completed)
    mib = 2**20
    out = {
        "model": args.model,
        "clients": args.clients,
        "duration_s": args.duration,
        "max_requests": args.max_requests,
        "server_args": args.server_args,
        "load_phase_s": round(wall, 1),
        "requests": len(results),
        "completed": len(completed),
        "disconnected_on_purpose": len(disconnected),
        "errors": len(errors),
        "error_samples": [f"{r.kind}/{r.endpoint}: {r.error}" for r in errors[:10]],
        "server_error_count": srv_errors,
        "by_endpoint": {
            e: sum(1 for r in completed if r.endpoint == e) for e in ("completions", "chat")
        },
        "by_client": {k: sum(1 for r in completed if r.kind == k) for k in ("aiohttp", "openai")},
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1) if wall else None,
        "requests_per_s": round(len(completed) / wall, 2) if wall else None,
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": cached,
        "cached_ratio": round(cached / prompt_tokens, 3) if prompt_tokens else None,
        "ttft_s": {p: _pct(ttfts, p) for p in (50, 90, 99)},
        "itl_s": {p: _pct(gaps, p) for p in (50, 90, 99)},
        "tpot_s": {p: _pct(tpots, p) for p in (50, 90)},
        "max_running": max((s["running"] for s in samples), default=0),
        "max_waiting": max((s["waiting"] for s in samples), default=0),
        "min_free_blocks": min((s["free_blocks"] for s in samples), default=None),
        "rss_mib": {
            "start": round(run["rss_start"] / mib, 1),
            "after_warmup": round(rss_warm / mib, 1) if rss_warm else None,
            "end_of_load": round(run["rss_end"] / mib, 1),
            "after_idle": round(run["rss_idle"] / mib, 1),
        },
        "rss_slope_mib_per_min": round(rss_slope * 60, 3) if rss_slope is not None else None,
        "rss_steady_growth_mib": round(rss_slope * steady_s, 1) if rss_slope is not None else None,
        "steady_phase_s": round(steady_s, 1),
        "blocks_total": after.get("engine_kv_blocks_total"),
        "free_blocks_before": before.get("engine_kv_blocks_free"),
        "free_blocks_after": after.get("engine_kv_blocks_free"),
        "leaked_blocks": leaked,
        "server_aborts": after["aborts"] - before["aborts"],
        "server_requests": after.get("engine_requests_total", 0)
        - before.get("engine_requests_total", 0),
        "health_after": run["health"],
        "server_exit_code": exit_code,
        "server_log_errors": len(log_errors(server_log)),
        "server_log_error_samples": log_errors(server_log)[:5],
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "samples": run["samples"],
    }
    problems = []
    if errors or srv_errors:
        problems.append(f"{len(errors)} client errors, {srv_errors:.0f} server errors")
    if "engine_kv_blocks_total" not in after or "engine_kv_blocks_free" not in after:
        problems.append("the server's /metrics has no block pool figures: leaks unchecked")
    elif leaked or before.get("engine_kv_blocks_free") != before.get("engine_kv_blocks_total"):
        problems.append(f"{leaked:.0f} blocks not back in the pool")
    if out["server_requests"] != len(results):
        problems.append(
            f"the server counted {out['server_requests']:.0f} requests, "
            f"the clients sent {len(results)}"
        )
    if out["server_log_errors"]:
        problems.append(f"{out['server_log_errors']} error lines in the server's log")
    if run["health"] != 200 or exit_code != 0:
        problems.append(f"health {run['health']}, server exit code {exit_code}")
    growth = out["rss_steady_growth_mib"]
    if args.max_rss_growth is not None:
        if growth is None:
            problems.append("too few RSS samples after the warm-up to check --max-rss-growth")
        elif growth > args.max_rss_growth:
            problems.append(
                f"RSS grew {growth} MiB over the steady phase (> {args.max_rss_growth})"
            )
    out["problems"] = problems
    out["ok"] = not problems
    return out


def _pct(xs: list[float], p: float) -> float | None:
    """The ``p``-th percentile rounded for the report (None without values)."""
    x = percentile(xs, p, empty=None)
    return None if x is None else round(x, 4)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms"


def print_table(s: dict[str, Any]) -> None:
    rss = s["rss_mib"]
    rows = [
        (
            "model / clients",
            f"{s['model']} / {s['clients']} ({s['server_args'] or 'default flags'})",
        ),
        (
            "load phase",
            f"{s['load_phase_s']} s (bound {s['duration_s']} s, {s['max_requests']} requests)",
        ),
        (
            "requests",
            f"{s['requests']}: {s['completed']} completed, "
            f"{s['disconnected_on_purpose']} disconnected on purpose",
        ),
        (
            "  completed by endpoint",
            f"completions {s['by_endpoint']['completions']}, chat {s['by_endpoint']['chat']}",
        ),
        (
            "  completed by client",
            f"aiohttp {s['by_client']['aiohttp']}, openai {s['by_client']['openai']}",
        ),
        ("errors", f"{s['errors']} (server counted {s['server_error_count']:.0f})"),
        ("requests/s", s["requests_per_s"]),
        ("output tokens/s", f"{s['output_tokens_per_s']} ({s['output_tokens']} tokens)"),
        (
            "prompt tokens cached",
            f"{s['cached_prompt_tokens']} of {s['prompt_tokens']} ({s['cached_ratio']})",
        ),
        ("TTFT p50 / p90 / p99", " / ".join(_ms(s["ttft_s"][p]) for p in (50, 90, 99))),
        ("ITL (chunk gap) p50 / p90 / p99", " / ".join(_ms(s["itl_s"][p]) for p in (50, 90, 99))),
        ("TPOT p50 / p90", " / ".join(_ms(s["tpot_s"][p]) for p in (50, 90))),
        ("max running / waiting", f"{s['max_running']:.0f} / {s['max_waiting']:.0f}"),
        (
            "RSS start / warm / end / idle",
            f"{rss['start']} / {rss['after_warmup']} / "
            f"{rss['end_of_load']} / {rss['after_idle']} MiB",
        ),
        (
            "RSS slope (steady phase)",
            f"{s['rss_slope_mib_per_min']} MiB/min over "
            f"{s['steady_phase_s']} s ({s['rss_steady_growth_mib']} MiB)",
        ),
        (
            "free blocks before / after",
            f"{s['free_blocks_before']:.0f} / {s['free_blocks_after']:.0f} "
            f"of {s['blocks_total']:.0f} (min during {s['min_free_blocks']:.0f})",
        ),
        (
            "server: requests / aborts counted",
            f"{s['server_requests']:.0f} / {s['server_aborts']:.0f}",
        ),
        (
            "health / server exit / log errors",
            f"{s['health_after']} / {s['server_exit_code']} / {s['server_log_errors']}",
        ),
        ("load average (1 min) / CPUs", f"{s['loadavg_1m_at_end']} / {s['cpus']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for e in s["error_samples"]:
        print("  error:", e)
    for line in s["server_log_error_samples"]:
        print("  server log:", line)
    print("RESULT:", "ok" if s["ok"] else "FAILED: " + "; ".join(s["problems"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (default), bench or a checkpoint dir")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=180.0, help="seconds to send requests")
    p.add_argument("--max-requests", type=int, default=20000, help="requests in all, at most")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds before the steady phase")
    p.add_argument("--sample-interval", type=float, default=3.0)
    p.add_argument("--disconnect-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra engine serve flags, one string")
    p.add_argument(
        "--max-rss-growth",
        type=float,
        default=None,
        help="fail if RSS grows more than this many MiB over the steady phase",
    )
    p.add_argument("--json", default=None, help="write the summary (and samples) here")
    p.add_argument("-v", "--verbose", action="store_true", help="print each sample")
    args = p.parse_args(argv)
    args.served_model = args.model
    extra = shlex.split(args.server_args)
    if "--served-model-name" in extra:
        args.served_model = extra[extra.index("--served-model-name") + 1]

    server = start_server(args.model, extra)
    print(
        f"engine serve pid {server.proc.pid} on {server.url}; {args.clients} clients for "
        f"{args.duration:.0f} s (at most {args.max_requests} requests)",
        flush=True,
    )
    try:
        run = asyncio.run(load(args, server))
    except BaseException:
        print(server.log_tail(), file=sys.stderr)
        server.proc.stop(60)
        raise
    exit_code = server.proc.stop(60)
    summary = summarize(args, run, exit_code, server.log_tail(10**9))
    print_table(summary)
    if not summary["ok"]:
        print(server.log_tail(), file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    os.unlink(server.proc.log_path)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
