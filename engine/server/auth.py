"""The API key, as vLLM's ``--api-key``: every route but the probes needs
``Authorization: Bearer <key>``. The check runs before the body is read, so a request
without the key costs a header comparison, never a body."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engine.server.protocol import ApiError
from kvcore.bearer import OPEN_PATHS, bearer_matches


def api_key_middleware(api_key: str) -> Any:
    """An aiohttp middleware refusing (401) requests without ``api_key``."""
    expected = api_key.encode()

    @web.middleware
    async def require_api_key(request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if request.path not in OPEN_PATHS and not bearer_matches(header, expected):
            raise ApiError(
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                None,
                "invalid_api_key",
                401,
            )
        return await handler(request)

    return require_api_key
