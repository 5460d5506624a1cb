"""The API key, as vLLM's ``--api-key``: every route but the probes needs
``Authorization: Bearer <key>``. The check runs before the body is read, so a request
without the key costs a header comparison, never a body."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from engine.server.protocol import ApiError

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no key


def api_key_middleware(api_key: str) -> Any:
    """An aiohttp middleware refusing (401) requests without ``api_key``."""
    expected = api_key.encode()

    @web.middleware
    async def require_api_key(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in OPEN_PATHS and not _has_key(request, expected):
            raise ApiError("missing or invalid API key: send 'Authorization: Bearer <key>'",
                           None, "invalid_api_key", 401)  # fmt: skip
        return await handler(request)

    return require_api_key


def _has_key(request: web.Request, expected: bytes) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of a guess was right
    given = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, expected)
