"""Prefill/decode disaggregation: a prefill leg, then the decode leg with its KV handle.

The shape is vLLM's disaggregated serving proxy: the prefill node gets the request with
``max_tokens = 1``, no streaming, and ``kv_transfer_params = {"do_remote_decode": true}``;
it answers with ``kv_transfer_params`` naming the KV it kept, which the decode node gets
with the original request. With no healthy prefill node, or none that answers, the
decode node does the whole request (it recomputes the prompt). A prefill node that took
the request and failed (5xx, or a connection cut) is not followed by another: the decode
node does it, so an input that crashes engines reaches one of each role, not all.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from aiohttp import web

from router.forward import UpstreamFailed
from router.routing import Router

log = logging.getLogger("kvrouter")

PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg's request: one token, not streamed, KV kept for a remote decode."""
    out = copy.deepcopy(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    return out


async def prefill(
    router: Router, path: str, body: dict[str, Any], headers: dict[str, str], hashes: list[bytes]
) -> tuple[dict[str, Any] | None, web.Response | None]:
    """Run the prefill leg: (kv_transfer_params or None, a client-error response or None)."""
    tried: set[str] = set()
    leg = prefill_body(body)
    while (d := router.decide("prefill", hashes, tried)) is not None:
        tried.add(d.backend.url)
        try:
            status, answer = await router.forwarder.post_json(d.backend, path, leg, headers)
        except UpstreamFailed as e:
            log.warning("prefill leg failed: %s", e)
            if e.retryable:
                continue
            break
        if status >= 500:
            log.warning("prefill leg failed: %s answered %d", d.backend.url, status)
            break
        if status >= 400:  # the request itself is bad: every node would say so
            return None, web.json_response(answer, status=status)
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        return (params if isinstance(params, dict) else None), None
    router.metrics.pd_fallbacks.inc()
    return None, None


async def route_pd(
    router: Router,
    request: web.Request,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    hashes: list[bytes],
) -> web.StreamResponse:
    params, error = await prefill(router, path, body, headers, hashes)
    if error is not None:
        return error
    decode = dict(body)
    if params is not None:
        decode["kv_transfer_params"] = params
    return await router.route(request, "decode", path, decode, headers, hashes)
