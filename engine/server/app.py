"""The aiohttp application: OpenAI-compatible routes over an :class:`AsyncEngine`.

=========================  ===============================================================
``POST /v1/completions``       text or token-id prompt; ``stream`` as server-sent events
``POST /v1/chat/completions``  messages rendered by the chat template; ``stream`` too
``GET /v1/models``             the one served model
``GET /health``                200 while the engine loop runs, 503 after
``GET /metrics``               Prometheus text (``engine.server.metrics``)
=========================  ===============================================================

Handlers never touch the engine directly: they check the body (``body``, ``protocol``),
tokenize off the event loop (``prompt``), and read outputs from ``AsyncEngine.generate``.
The generator is always closed (``aclosing``), so a client that disconnects, or a write
that fails, aborts its request. With an API key (``auth``) every route but ``/health``
and ``/metrics`` needs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.errors import EngineError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.server.auth import api_key_middleware
from engine.server.body import read_json
from engine.server.chat import ChatTemplate
from engine.server.config import ServerConfig
from engine.server.metrics import ServerMetrics
from engine.server.prompt import fit_max_tokens, prompt_ids
from engine.server.protocol import ApiError, GenerationRequest, parse_chat, parse_completion
from engine.server.responses import Reply, TextDeltas

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerContext:
    engine: AsyncEngine
    model: str  # the served model name clients must send
    chat_template: ChatTemplate
    metrics: ServerMetrics
    config: ServerConfig = field(default_factory=ServerConfig)
    pool: ThreadPoolExecutor | None = None  # tokenizers (make_app makes it)

    @property
    def max_body(self) -> int:
        return self.config.max_body_bytes(self.engine.engine.max_model_len)


CONTEXT = web.AppKey("context", ServerContext)
ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/models": "models",
    "/health": "health",
    "/metrics": "metrics",
}


def make_app(context: ServerContext) -> web.Application:
    middlewares: list[Any] = [_errors]
    if context.config.api_key is not None:
        middlewares.append(api_key_middleware(context.config.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=context.max_body)
    if context.pool is None:
        context.pool = ThreadPoolExecutor(context.config.tokenizer_threads, "tokenize")
    app.on_cleanup.append(_close_pool)
    app[CONTEXT] = context
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error as OpenAI's error body; a vanished client is not an error."""
    try:
        return await handler(request)
    except ApiError as e:
        error = e
    except InvalidRequestError as e:
        error = ApiError(str(e), None, "invalid_value")
    except EngineDeadError as e:
        error = ApiError(str(e), None, "engine_unavailable", 503, "server_error")
    except EngineError as e:  # e.g. a KV load failed under kv_load_failure_policy "fail"
        error = ApiError(str(e), None, "engine_error", 500, "server_error")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "not_found_error" if e.status == 404 else "invalid_request_error"
        error = ApiError(f"{e.reason}: {request.method} {request.path}", None, None, e.status, kind)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # a bug: say so, keep serving
        log.exception("%s %s failed", request.method, request.path)
        error = ApiError(
            f"internal error: {type(e).__name__}: {e}", None, None, 500, "server_error"
        )
    endpoint = ENDPOINTS.get(request.path, "other")  # bounded label values
    request.app[CONTEXT].metrics.errors.labels(endpoint, str(error.status)).inc()
    return web.json_response(error.body(), status=error.status)


async def _close_pool(app: web.Application) -> None:
    pool = app[CONTEXT].pool
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    req = parse_completion(await read_json(request, ctx.max_body), ctx.model)
    return await _respond(request, ctx, req, Reply(f"cmpl-{uuid.uuid4().hex}", ctx.model, False))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    body = await read_json(request, ctx.max_body)
    req = parse_chat(body, ctx.model, ctx.engine.engine.max_model_len)
    reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", ctx.model, True)
    return await _respond(request, ctx, req, reply)


def _check_kv_transfer(ctx: ServerContext, params: dict) -> None:
    """400 for ``kv_transfer_params`` past the connector's limits (an off-list
    ``remote_store``, a ``lease_ttl`` over ``max_lease_ttl``; connector/disagg.py)."""
    from connector.disagg import check_params

    connector = ctx.engine.engine.connector
    why = check_params(params, connector.handoff_policy if connector is not None else None)
    if why is not None:
        raise ApiError(why, "kv_transfer_params", "invalid_value")


async def _respond(
    request: web.Request, ctx: ServerContext, req: GenerationRequest, reply: Reply
) -> web.StreamResponse:
    engine = ctx.engine.engine
    max_chars = ctx.config.max_prompt_chars(engine.max_model_len)
    assert ctx.pool is not None
    ids = await prompt_ids(engine, req, ctx.chat_template, max_chars, ctx.pool)
    req = fit_max_tokens(req, len(ids), engine.max_model_len)
    endpoint = "chat" if reply.chat else "completions"
    if req.kv_transfer_params is not None:  # the engine's own limits, before any stream starts
        _check_kv_transfer(ctx, req.kv_transfer_params)
    outs = ctx.engine.generate(ids, req.params, req.cache_salt, reply.id, req.kv_transfer_params)
    if req.stream:
        return await _stream(request, ctx, req, reply, outs, endpoint)
    last: RequestOutput | None = None
    try:
        async with aclosing(outs):
            async for last in outs:  # noqa: B007 - the last output is the answer
                pass
    except asyncio.CancelledError:  # the client went away; aclosing aborted the request
        ctx.metrics.requests.labels(endpoint, "abort").inc()
        raise
    assert last is not None and last.finished
    ctx.metrics.observe(endpoint, last)
    return web.json_response(reply.full(last))


async def _stream(
    request: web.Request,
    ctx: ServerContext,
    req: GenerationRequest,
    reply: Reply,
    outs: Any,
    endpoint: str,
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    deltas, last = TextDeltas(req.params.stop), None
    try:
        async with aclosing(outs):
            if reply.chat:
                await _send(resp, reply.chunk("", first=True))
            async for last in outs:
                text = deltas.next(last.text, last.finished)
                if last.finished:
                    await _send(resp, reply.chunk(text, last.finish_reason, out=last))
                elif text:
                    await _send(resp, reply.chunk(text))
    except ConnectionResetError:  # a write found the client gone (aclosing aborted the
        # request); returning, not raising, keeps aiohttp from logging it as a 500
        ctx.metrics.requests.labels(endpoint, "abort").inc()
        return resp
    except asyncio.CancelledError:
        ctx.metrics.requests.labels(endpoint, "abort").inc()
        raise
    except EngineError as e:  # the status line is sent: report the error in the stream
        error = ApiError(str(e), None, "engine_error", 500, "server_error")
        return await _finish_stream(resp, [_event(error.body())])
    ctx.metrics.observe(endpoint, last)
    usage = [_event(reply.usage_chunk(last))] if req.include_usage else []
    return await _finish_stream(resp, [*usage, b"data: [DONE]\n\n"])


async def _finish_stream(resp: web.StreamResponse, events: list[bytes]) -> web.StreamResponse:
    """Write the last events; a client already gone (the request is over) is no error."""
    try:
        for event in events:
            await resp.write(event)
        await resp.write_eof()
    except ConnectionResetError:
        pass
    return resp


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _send(resp: web.StreamResponse, body: dict) -> None:
    await resp.write(_event(body))


async def models(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    card = {
        "id": ctx.model,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "kvstore",
        "max_model_len": ctx.engine.engine.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    if not request.app[CONTEXT].engine.alive:
        return web.json_response({"status": "engine stopped"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    text = ctx.metrics.render(ctx.engine.stats)
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
