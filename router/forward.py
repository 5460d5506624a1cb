"""Send one request to a backend and relay its answer, streaming bytes as they come.

A backend that fails before the client got a byte (no connection, a 5xx status, a body
cut short) raises ``UpstreamFailed`` so the caller can try another. Once a stream has
started nothing can be retried: if the backend dies then, the client gets an SSE error
event and a cleanly ended response.
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

PASSED_HEADERS = ("Authorization", "X-Request-Id")
BACKEND_HEADER = "X-Kvrouter-Backend"


class UpstreamFailed(Exception):
    """The backend failed before anything reached the client."""


def upstream_headers(request: web.Request, request_id: str) -> dict[str, str]:
    out = {h: request.headers[h] for h in PASSED_HEADERS if h in request.headers}
    out.setdefault("X-Request-Id", request_id)
    return out


class Forwarder:
    def __init__(self, session: aiohttp.ClientSession, metrics: RouterMetrics) -> None:
        self.session, self.metrics = session, metrics

    async def post_json(
        self, backend: Backend, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, Any]:
        """POST and read the whole JSON answer (the P/D prefill leg): (status, json)."""
        async with self._track(backend):
            try:
                async with self.session.post(backend.url + path, json=body, headers=headers) as up:
                    if up.status >= 500:
                        raise UpstreamFailed(f"{backend.url} answered {up.status}")
                    return up.status, await up.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                raise UpstreamFailed(f"{backend.url}: {e!r}") from None

    async def relay(
        self, request: web.Request, backend: Backend, path: str, body: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:  # fmt: skip
        """POST ``body`` to ``backend`` and pass its answer to the client."""
        async with self._track(backend):
            try:
                up_cm = self.session.post(backend.url + path, json=body, headers=headers)
                up = await up_cm.__aenter__()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                raise UpstreamFailed(f"{backend.url}: {e!r}") from None
            try:
                return await self._relay_open(request, backend, up)
            finally:
                await up_cm.__aexit__(None, None, None)

    async def _relay_open(
        self, request: web.Request, backend: Backend, up: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        if up.status >= 500:
            raise UpstreamFailed(f"{backend.url} answered {up.status}")
        ctype = up.headers.get("Content-Type", "application/json")
        headers = {"Content-Type": ctype, BACKEND_HEADER: backend.url}
        if not ctype.startswith("text/event-stream"):
            try:
                data = await up.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                raise UpstreamFailed(f"{backend.url}: {e!r}") from None
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
