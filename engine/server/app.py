"""The aiohttp application: OpenAI-compatible routes over an :class:`AsyncEngine`.

=========================  ===============================================================
``POST /v1/completions``       text or token-id prompt; ``stream`` as server-sent events
``POST /v1/chat/completions``  messages rendered by the chat template; ``stream`` too
``GET /v1/models``             the one served model
``GET /health``                200 while the engine loop runs, 503 after
``GET /metrics``               Prometheus text (``engine.server.metrics``)
=========================  ===============================================================

Handlers never touch the engine directly: they check the body (``protocol``), tokenize,
and read outputs from ``AsyncEngine.generate``. The generator is always closed
(``aclosing``), so a client that disconnects, or a write that fails, aborts its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.errors import EngineError, InvalidRequestError
from engine.outputs import RequestOutput
from engine.server.chat import ChatTemplate
from engine.server.metrics import ServerMetrics
from engine.server.protocol import ApiError, GenerationRequest, parse_chat, parse_completion
from engine.server.responses import Reply, TextDeltas

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20  # long prompts as JSON token-id arrays run to megabytes


@dataclass(slots=True)
class ServerContext:
    engine: AsyncEngine
    model: str  # the served model name clients must send
    chat_template: ChatTemplate
    metrics: ServerMetrics


CONTEXT = web.AppKey("context", ServerContext)
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat",
             "/v1/models": "models", "/health": "health", "/metrics": "metrics"}  # fmt: skip


def make_app(context: ServerContext) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
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
        error = ApiError(f"internal error: {type(e).__name__}: {e}", None, None, 500,
                         "server_error")  # fmt: skip
    endpoint = ENDPOINTS.get(request.path, "other")  # bounded label values
    request.app[CONTEXT].metrics.errors.labels(endpoint, str(error.status)).inc()
    return web.json_response(error.body(), status=error.status)


async def _body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}", None, "invalid_json") from None


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    req = parse_completion(await _body(request), ctx.model)
    ids = _tokenize(ctx, req.prompt, "prompt")
    return await _respond(
        request, ctx, req, ids, Reply(f"cmpl-{uuid.uuid4().hex}", ctx.model, False)
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    req = parse_chat(await _body(request), ctx.model, ctx.engine.engine.max_model_len)
    ids = _tokenize(ctx, ctx.chat_template.render(req.messages), "messages")
    reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", ctx.model, True)
    return await _respond(request, ctx, req, ids, reply)


def _tokenize(ctx: ServerContext, prompt: str | list[int], param: str) -> list[int]:
    """Prompt token ids, checked against the vocabulary and the context length."""
    engine = ctx.engine.engine
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise ApiError(f"model {ctx.model} has no tokenizer; send token ids", param,
                           "no_tokenizer")  # fmt: skip
        prompt = engine.tokenizer.encode(prompt)
    if len(prompt) >= engine.max_model_len:
        raise ApiError(
            f"this model's context is {engine.max_model_len} tokens and the prompt has "
            f"{len(prompt)}; at least one token must be left to generate",
            param, "context_length_exceeded",
        )  # fmt: skip
    try:
        return engine.tokenize(prompt)
    except InvalidRequestError as e:
        raise ApiError(str(e), param, "invalid_value") from None


async def _respond(request: web.Request, ctx: ServerContext, req: GenerationRequest,
                   ids: list[int], reply: Reply) -> web.StreamResponse:  # fmt: skip
    endpoint = "chat" if reply.chat else "completions"
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


async def _stream(request: web.Request, ctx: ServerContext, req: GenerationRequest,
                  reply: Reply, outs: Any, endpoint: str) -> web.StreamResponse:  # fmt: skip
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})  # fmt: skip
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
    card = {"id": ctx.model, "object": "model", "created": int(time.time()), "owned_by": "kvstore",
            "max_model_len": ctx.engine.engine.max_model_len}  # fmt: skip
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    if not request.app[CONTEXT].engine.alive:
        return web.json_response({"status": "engine stopped"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    text = ctx.metrics.render(ctx.engine.stats)
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
