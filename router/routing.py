"""Choose a backend by policy and relay to it, trying another only while nothing was sent."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from router.backends import BackendPool
from router.errors import error_response
from router.forward import Forwarder, UpstreamFailed
from router.metrics import RouterMetrics
from router.policies import Decision, Policy

log = logging.getLogger("kvrouter")


class Router:
    """Pool + policy + forwarder: ``route`` is one request's whole trip through one role."""

    def __init__(
        self, pool: BackendPool, policy: Policy, forwarder: Forwarder, metrics: RouterMetrics
    ) -> None:
        self.pool, self.policy, self.forwarder, self.metrics = pool, policy, forwarder, metrics

    def decide(self, role: str, hashes: list[bytes], exclude: set[str]) -> Decision | None:
        """A healthy backend of ``role`` outside ``exclude``, or None if there is none."""
        candidates = self.pool.healthy(role, exclude)
        if not candidates:
            return None
        d = self.policy.choose(candidates, hashes)
        self.metrics.decisions.labels(self.policy.name, d.backend.url).inc()
        self.metrics.predicted_hits.labels(self.policy.name).observe(d.hit_tokens)
        return d

    async def route(
        self,
        request: web.Request,
        role: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        hashes: list[bytes],
    ) -> web.StreamResponse:
        tried: set[str] = set()
        last_error = "no healthy backend"
        while (d := self.decide(role, hashes, tried)) is not None:
            tried.add(d.backend.url)
            try:
                return await self.forwarder.relay(request, d.backend, path, body, headers)
            except UpstreamFailed as e:
                if not e.retryable:  # it may have been this request's doing: not again
                    log.warning("backend failed, not retried: %s", e)
                    return error_response(
                        502,
                        f"the backend failed ({e})",
                        code="upstream_error",
                        err_type="server_error",
                    )
                log.warning("retrying elsewhere: %s", e)
                last_error = str(e)
        status = 503 if not tried else 502
        return error_response(
            status,
            f"no backend could serve the request ({last_error})",
            code="no_backend",
            err_type="server_error",
        )
