"""OpenAI-style error responses."""

from __future__ import annotations

from aiohttp import web


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    err_type: str = "invalid_request_error",
) -> web.Response:
    """``{"error": {"message", "type", "param", "code"}}`` with ``status``."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return web.json_response(body, status=status)


def sse_error(message: str, code: str = "upstream_error") -> bytes:
    """An error as one SSE event, for a stream that already started."""
    import json

    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()
