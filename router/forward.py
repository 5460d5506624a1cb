"""Send one request to a backend and relay its answer, streaming bytes as they come.

A backend's answer, 5xx included, is the client's answer. A backend that fails without
one (no connection, a connection cut, a body cut short) raises ``UpstreamFailed`` and is
marked unhealthy; ``retryable`` is true only when no connection was made, so nothing of
the request was sent. Anything else may be the request's own doing (an input that
crashes an engine), and trying it on every backend would let one request take them all
down. Once a stream has started, if the backend dies the client gets an SSE error event
and a cleanly ended response.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from router.backends import Backend
from router.errors import sse_error
from router.health import mark_failed
from router.metrics import RouterMetrics

PASSED_HEADERS = ("X-Request-Id",)  # never Authorization: backends get the router's key
BACKEND_HEADER = "X-Kvrouter-Backend"
# Failures that happen before a connection exists, so before any byte of the request left.
_NOT_SENT: tuple[type[Exception], ...] = (aiohttp.ClientConnectorError,)
if hasattr(aiohttp, "ConnectionTimeoutError"):  # aiohttp >= 3.10: the connect timeout
    _NOT_SENT += (aiohttp.ConnectionTimeoutError,)


class UpstreamFailed(Exception):
    """The backend failed before anything reached the client; ``retryable``: and before
    anything of the request reached the backend."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def upstream_failed(backend: Backend, e: BaseException) -> UpstreamFailed:
    return UpstreamFailed(f"{backend.url}: {e!r}", retryable=isinstance(e, _NOT_SENT))


def upstream_headers(request: web.Request, request_id: str) -> dict[str, str]:
    out = {h: request.headers[h] for h in PASSED_HEADERS if h in request.headers}
    out.setdefault("X-Request-Id", request_id)
    return out


def backend_auth(key: str | None) -> dict[str, str]:
    """The headers that authenticate the router to its backends."""
    return {"Authorization": f"Bearer {key}"} if key else {}


class Forwarder:
    def __init__(self, session: aiohttp.ClientSession, metrics: RouterMetrics) -> None:
        self.session, self.metrics = session, metrics

    async def post_json(
        self, backend: Backend, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, Any]:
        """POST and read the whole JSON answer (the P/D prefill leg): (status, json), the
        json None for a 5xx."""
        async with self._track(backend):
            try:
                async with self.session.post(backend.url + path, json=body, headers=headers) as up:
                    if up.status >= 500:
                        self.metrics.errors.labels(backend.url).inc()
                        return up.status, None
                    return up.status, await up.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                raise upstream_failed(backend, e) from None

    async def relay(
        self,
        request: web.Request,
        backend: Backend,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """POST ``body`` to ``backend`` and pass its answer to the client."""
        async with self._track(backend):
            try:
                up_cm = self.session.post(backend.url + path, json=body, headers=headers)
                up = await up_cm.__aenter__()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                raise upstream_failed(backend, e) from None
            try:
                return await self._relay_open(request, backend, up)
            finally:
                await up_cm.__aexit__(None, None, None)

    async def _relay_open(
        self, request: web.Request, backend: Backend, up: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        if up.status >= 500:  # its answer goes to the client; health checks judge the backend
            self.metrics.errors.labels(backend.url).inc()
        ctype = up.headers.get("Content-Type", "application/json")
        headers = {"Content-Type": ctype, BACKEND_HEADER: backend.url}
        if not ctype.startswith("text/event-stream"):
            try:
                data = await up.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                raise upstream_failed(backend, e) from None
            return web.Response(body=data, status=up.status, headers=headers)
        resp = web.StreamResponse(status=up.status, headers=headers)
        await resp.prepare(request)  # from here on, no retry
        while True:
            try:
                chunk = await up.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                self._failed(backend)
                await resp.write(sse_error(f"backend {backend.url} failed mid-stream: {e!r}"))
                break
            if not chunk:
                break
            await resp.write(chunk)  # a client that left raises here and aborts upstream
        await resp.write_eof()
        return resp

    def _failed(self, backend: Backend) -> None:
        self.metrics.errors.labels(backend.url).inc()
        mark_failed(backend, self.metrics)

    def _track(self, backend: Backend) -> _Tracked:
        return _Tracked(self, backend)


class _Tracked:
    """Counts a request in flight on ``backend`` and records its outcome and latency."""

    def __init__(self, fwd: Forwarder, backend: Backend) -> None:
        self.fwd, self.backend = fwd, backend

    async def __aenter__(self) -> None:
        self.t0 = time.perf_counter()
        self.backend.in_flight += 1
        m = self.fwd.metrics
        m.requests.labels(self.backend.url).inc()
        m.in_flight.labels(self.backend.url).set(self.backend.in_flight)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        b, m = self.backend, self.fwd.metrics
        b.in_flight -= 1
        m.in_flight.labels(b.url).set(b.in_flight)
        m.latency.labels(b.url).observe(time.perf_counter() - self.t0)
        if exc_type is UpstreamFailed:
            self.fwd._failed(b)
