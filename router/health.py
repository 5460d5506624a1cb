"""Periodic health checks: ``GET /health`` on every backend; 200 means it takes requests.

A backend that fails a request is marked unhealthy at once (``mark_failed``) and comes
back at the first check it passes. The check also reads the backend's ``/metrics`` for
running + waiting requests when it exports them (``engine serve``'s
``engine_requests_running`` / ``engine_requests_waiting``, vLLM's
``vllm:num_requests_running`` / ``vllm:num_requests_waiting``), so load from other
clients counts.
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp

from router.backends import Backend, BackendPool
from router.metrics import RouterMetrics

log = logging.getLogger("kvrouter")
_LOAD_RE = re.compile(
    r"^(?:vllm:num_requests|engine_requests)_(?:running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$",
    re.M,
)


def parse_load(metrics_text: str) -> int | None:
    """Running + waiting requests from a Prometheus text page, or None if absent."""
    values = [float(v) for v in _LOAD_RE.findall(metrics_text)]
    return int(sum(values)) if values else None


def mark_failed(backend: Backend, metrics: RouterMetrics) -> None:
    if backend.healthy:
        log.warning("backend %s failed; unhealthy until it passes a health check", backend.url)
    backend.healthy = False
    metrics.healthy.labels(backend.url).set(0)


class HealthChecker:
    def __init__(
        self,
        pool: BackendPool,
        session: aiohttp.ClientSession,
        metrics: RouterMetrics,
        interval: float,
        timeout: float,
    ) -> None:
        self.pool, self.session, self.metrics = pool, session, metrics
        self.interval, self.timeout = interval, timeout

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.pool.backends))

    async def check(self, backend: Backend) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session.get(backend.url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
            if ok:
                await self._scrape_load(backend, timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if ok != backend.healthy:
            log.warning("backend %s is %s", backend.url, "healthy" if ok else "unhealthy")
        backend.healthy = ok
        self.metrics.healthy.labels(backend.url).set(int(ok))

    async def _scrape_load(self, backend: Backend, timeout: aiohttp.ClientTimeout) -> None:
        try:
            async with self.session.get(backend.url + "/metrics", timeout=timeout) as resp:
                text = await resp.text() if resp.status == 200 else ""
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError):
            text = ""
        load = parse_load(text)
        backend.scraped_load = load if load is not None else 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_all()
