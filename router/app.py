"""The router's aiohttp application: OpenAI-compatible routes, auth, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import aiohttp
import zmq.asyncio
from aiohttp import web

from kvcore.bearer import OPEN_PATHS, bearer_matches
from router.backends import BackendPool
from router.config import RouterConfig
from router.errors import error_response
from router.forward import Forwarder, backend_auth, upstream_headers
from router.health import HealthChecker
from router.intake import BodyTooLarge, Intake
from router.kv_index import KVIndex
from router.kv_subscriber import KVEventSubscriber
from router.metrics import RouterMetrics
from router.pd import route_pd
from router.policies import make_policy
from router.prompt import PromptHasher, load_tokenizer
from router.routing import Router
from router.validate import BadRequest

log = logging.getLogger("kvrouter")
CONFIG, ROUTER, HASHER, INDEX, INTAKE = (
    web.AppKey(n, object) for n in ("config", "router", "hasher", "index", "intake")
)


def build_pool(cfg: RouterConfig) -> BackendPool:
    pool = BackendPool.of(cfg.backends, "both")
    pool.add(cfg.prefill, "prefill")
    pool.add(cfg.decode, "decode")
    return pool


@web.middleware
async def auth_middleware(request: web.Request, handler):
    key = request.app[CONFIG].api_key
    if key and request.path not in OPEN_PATHS:
        if not bearer_matches(request.headers.get("Authorization", ""), key.encode()):
            return error_response(
                401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key"
            )
    return await handler(request)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "/v1/completions", chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "/v1/chat/completions", chat=True)


async def _generate(request: web.Request, path: str, chat: bool) -> web.StreamResponse:
    router: Router = request.app[ROUTER]
    intake: Intake = request.app[INTAKE]
    try:
        raw = await intake.read(request)
        body, hashes = await intake.prepare(raw, chat, router.policy.needs_hashes)
    except BodyTooLarge:
        return error_response(
            413,
            f"the request body is larger than {intake.max_body_bytes} "
            "bytes (kvrouter --max-body-bytes)",
            code="request_too_large",
        )
    except BadRequest as e:
        return error_response(400, str(e), e.param)
    headers = upstream_headers(request, request.headers.get("X-Request-Id") or uuid.uuid4().hex)
    if request.app[CONFIG].disaggregated:
        return await route_pd(router, request, path, body, headers, hashes)
    return await router.route(request, "both", path, body, headers, hashes)


async def models(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER]
    headers = upstream_headers(request, uuid.uuid4().hex)
    for b in [b for b in router.pool.backends if b.healthy]:
        try:
            async with router.forwarder.session.get(b.url + "/v1/models", headers=headers) as up:
                if up.status == 200:
                    return web.json_response(await up.json(content_type=None))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            continue
    return error_response(
        503, "no healthy backend answered /v1/models", code="no_backend", err_type="server_error"
    )


async def health(request: web.Request) -> web.Response:
    pool = request.app[ROUTER].pool
    states = {
        b.url: {"role": b.role, "healthy": b.healthy, "in_flight": b.in_flight}
        for b in pool.backends
    }
    serving = any(b.healthy for b in pool.backends if b.role in ("both", "decode"))
    return web.json_response(
        {"status": "ok" if serving else "unavailable", "backends": states},
        status=200 if serving else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[ROUTER].metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def not_found(request: web.Request) -> web.Response:
    return error_response(404, f"no route {request.method} {request.path}", code="not_found")


def create_app(cfg: RouterConfig) -> web.Application:
    app = web.Application(middlewares=[auth_middleware], client_max_size=cfg.max_body_bytes)
    app[CONFIG] = cfg
    app[INDEX] = KVIndex()
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    app[HASHER] = PromptHasher(cfg.block_size, tokenizer, cfg.route_prefix_tokens)
    app[INTAKE] = Intake(app[HASHER], cfg.max_body_bytes)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", not_found)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application):
    cfg: RouterConfig = app[CONFIG]
    timeout = aiohttp.ClientTimeout(
        total=None, connect=cfg.connect_timeout, sock_read=cfg.request_timeout
    )
    # Every call to a backend (requests, health checks, /metrics, /v1/models) carries the
    # backend key, and only it: upstream_headers never copies the client's Authorization.
    session = aiohttp.ClientSession(
        timeout=timeout,
        connector=aiohttp.TCPConnector(limit=0),
        headers=backend_auth(cfg.backend_api_key),
    )
    m = RouterMetrics()
    pool = build_pool(cfg)
    policy = make_policy(cfg.policy, app[INDEX], cfg.block_size, **_policy_kw(cfg))
    app[ROUTER] = Router(pool, policy, Forwarder(session, m), m)
    checker = HealthChecker(pool, session, m, cfg.health_interval, cfg.health_timeout)
    await checker.check_all()
    zctx = zmq.asyncio.Context()
    tasks = [asyncio.create_task(checker.run())]
    for url, pub, replay in cfg.kv_event_sources():
        sub = KVEventSubscriber(zctx, url, pub, replay, app[INDEX], m, cfg.kv_topic)
        tasks.append(asyncio.create_task(sub.run()))
    log.info("kvrouter: %d backends, policy %s", len(pool.backends), policy.name)
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    zctx.destroy(linger=0)
    await session.close()
    app[INTAKE].close()


def _policy_kw(cfg: RouterConfig) -> dict:
    return (
        {"alpha": cfg.load_alpha, "load_cap": cfg.load_cap} if cfg.policy == "prefix_aware" else {}
    )
