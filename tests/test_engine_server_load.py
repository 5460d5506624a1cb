"""Load on ``engine serve``: a short run of ``benchmarks/load_test.py`` (concurrent
streaming clients, aiohttp and the ``openai`` client, completions and chat, shared
prefixes, deliberate disconnects) against a real server with a KV pool small enough to
preempt and evict: no errors, no error in the server's log, every request accounted for,
the block pool back to full, the server's RSS flat after the warm-up. And what the load
test found: a client gone by the time a stream chunk is written."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
# RSS growth allowed over the few seconds after warm-up: flat is ~0-4 MiB (tiny model, a
# 2 MiB KV pool); the margin absorbs allocator noise on a busy 2-core VM.
RSS_GROWTH_MIB = 48


def test_a_short_load_with_disconnects_leaks_no_blocks(tmp_path):
    out = tmp_path / "load.json"
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "load_test.py"),
        "--clients",
        "12",
        "--duration",
        "6",
        "--warmup",
        "2",
        "--sample-interval",
        "1",
        "--disconnect-fraction",
        "0.3",
        "--server-args",
        "--kv-cache-memory 2MiB",
        "--max-rss-growth",
        str(RSS_GROWTH_MIB),
        "--json",
        str(out),
    ]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["ok"] and s["errors"] == 0 and s["server_error_count"] == 0
    assert s["completed"] > 0 and s["disconnected_on_purpose"] > 0 and s["server_aborts"] > 0
    assert s["server_requests"] == s["requests"]
    assert s["by_client"]["openai"] > 0 and s["by_endpoint"]["chat"] > 0
    assert s["free_blocks_before"] == s["free_blocks_after"] == s["blocks_total"] == 256
    assert s["leaked_blocks"] == 0
    assert s["min_free_blocks"] < s["blocks_total"]
    assert s["health_after"] == 200 and s["server_exit_code"] == 0
    # memory: flat over the steady phase (after the warm-up), bounded overall. The script
    # checks the least-squares growth (--max-rss-growth); it needs two steady samples.
    rss = s["rss_mib"]
    assert s["rss_steady_growth_mib"] is not None and s["steady_phase_s"] > 0, s["samples"]
    assert s["rss_steady_growth_mib"] <= RSS_GROWTH_MIB, (rss, s["samples"])
    assert max(rss["end_of_load"], rss["after_idle"]) - rss["after_warmup"] <= RSS_GROWTH_MIB, rss
    assert rss["after_idle"] - rss["start"] <= 4 * RSS_GROWTH_MIB, rss


class _GoneAfter(web.StreamResponse):
    """A stream response whose client vanishes after ``ok`` writes (aiohttp then raises
    ``ClientConnectionResetError: Cannot write to closing transport``)."""

    ok = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0

    async def prepare(self, request):  # noqa: ANN001 - no real request in this test
        return None

    async def write(self, data: bytes) -> None:
        self.writes += 1
        if self.writes > self.ok:
            raise ClientConnectionResetError("Cannot write to closing transport")

    async def write_eof(self, data: bytes = b"") -> None:
        raise ClientConnectionResetError("Cannot write to closing transport")


@pytest.mark.parametrize("ok, reason", [(2, "abort"), (10**6, "length")])
def test_a_write_to_a_vanished_client_ends_the_stream_without_an_error(monkeypatch, ok, reason):
    """Mid-stream the request is aborted and its blocks freed; after the last token (the
    usage chunk, [DONE] or the end fails) it counts as finished. Either way the handler
    returns: raising made aiohttp log a traceback and a 500 per disconnect under load."""
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.server import app
    from engine.server.chat import ChatTemplate
    from engine.server.metrics import ServerMetrics
    from engine.server.protocol import parse_completion
    from engine.server.responses import Reply

    monkeypatch.setattr(_GoneAfter, "ok", ok)
    monkeypatch.setattr(app, "web", SimpleNamespace(StreamResponse=_GoneAfter))
    engine = AsyncEngine(LLMEngine(EngineConfig(model="tiny", kv_cache_memory="1MiB")))
    engine.start()
    try:
        ctx = app.ServerContext(
            engine, "tiny", ChatTemplate.for_model("tiny"), ServerMetrics("tiny")
        )
        body = {
            "model": "tiny",
            "prompt": "x" * 100,
            "max_tokens": 40,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        req = parse_completion(body, "tiny")
        ids = engine.engine.tokenize(req.prompt)

        async def run() -> web.StreamResponse:
            reply = Reply("cmpl-gone", "tiny", False)
            outs = engine.generate(ids, req.params, None, reply.id)
            return await app._stream(None, ctx, req, reply, outs, "completions")

        resp = asyncio.run(run())
        assert isinstance(resp, _GoneAfter)
        metrics = ctx.metrics.registry
        assert (
            metrics.get_sample_value(
                "engine_requests_total", {"endpoint": "completions", "finish_reason": reason}
            )
            == 1
        )
        deadline = time.monotonic() + 20
        while engine.stats.free_blocks != engine.stats.num_blocks or engine.stats.running:
            assert time.monotonic() < deadline, engine.stats
            time.sleep(0.05)
    finally:
        engine.close()
