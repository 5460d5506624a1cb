"""A minimal engine HTTP worker for ``benchmarks/routing.py``: one ``LLMEngine`` behind
``/v1/completions`` (token-id or text prompts, SSE streaming), ``/health``, and its KV
events published with ``engine/kv_publisher.py``. Benchmark scaffolding only: the served
product is ``engine serve``.

    python benchmarks/routing_worker.py --port 8101 --kv-events tcp://127.0.0.1:5601 --model bench
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import queue
import sys
import threading
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig  # noqa: E402
from engine.errors import InvalidRequestError  # noqa: E402
from engine.kv_publisher import KVEventPublisher  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


class EngineThread:
    """Owns the engine: admits queued requests, steps, publishes KV events after each step."""

    def __init__(self, engine: LLMEngine, publisher: KVEventPublisher) -> None:
        self.engine, self.publisher = engine, publisher
        self.inbox: queue.Queue = queue.Queue()
        self.waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, prompt, params: SamplingParams) -> asyncio.Queue:
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        rid = f"w-{next(self._ids)}"
        self.waiters[rid] = (loop, q)
        self.inbox.put((rid, prompt, params))
        return q

    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            try:
                while True:
                    rid, prompt, params = self.inbox.get(block, 0.05)
                    block = False
                    try:
                        self.engine.add_request(prompt, params, request_id=rid)
                    except InvalidRequestError as e:
                        self._send(rid, e)
            except queue.Empty:
                pass
            for out in self.engine.step() if self.engine.has_unfinished() else ():
                self._send(out.request_id, out)
            self.publisher.publish(self.engine.take_kv_events())

    def _send(self, rid: str, item) -> None:
        loop, q = self.waiters[rid]
        if isinstance(item, Exception) or item.finished:
            del self.waiters[rid]
        loop.call_soon_threadsafe(q.put_nowait, item)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    try:
        params = SamplingParams(
            temperature=float(body.get("temperature", 0.0)),
            max_tokens=int(body.get("max_tokens", 16)),
        )
    except InvalidRequestError as e:
        return web.json_response(
            {"error": {"message": str(e), "type": "invalid_request_error"}}, status=400
        )
    q = request.app["engine"].submit(body["prompt"], params)
    if not body.get("stream"):
        while not isinstance(out := await q.get(), Exception) and not out.finished:
            pass
        if isinstance(out, Exception):
            return web.json_response(
                {"error": {"message": str(out), "type": "invalid_request_error"}}, status=400
            )
        return web.json_response(_answer(out))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    while True:
        out = await q.get()
        if isinstance(out, Exception):
            await resp.write(f"data: {json.dumps({'error': {'message': str(out)}})}\n\n".encode())
            break
        await resp.write(f"data: {json.dumps(_answer(out))}\n\n".encode())
        if out.finished:
            break
    await resp.write(b"data: [DONE]\n\n")
    return resp


def _answer(out) -> dict:
    m = out.metrics
    return {
        "choices": [
            {
                "index": 0,
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": m.num_prompt_tokens,
            "completion_tokens": len(out.token_ids),
            "prompt_tokens_details": {"cached_tokens": m.num_cached_tokens},
        },
    }


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kv-events", required=True)
    p.add_argument("--model", default="bench")
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    engine = LLMEngine(
        EngineConfig(model=a.model, kv_cache_memory=a.kv_cache_memory, enable_kv_events=True)
    )
    app = web.Application()
    app["engine"] = EngineThread(engine, KVEventPublisher(a.kv_events))
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
