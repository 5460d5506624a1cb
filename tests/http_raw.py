"""Raw HTTP for the server hardening tests: any bytes, any headers, nothing a client
library would tidy up first."""

from __future__ import annotations

import json
from typing import Any

from benchmarks.harness import http_request


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str | None] | None = None,
    timeout: float = 60,
) -> tuple[int, Any]:
    """(status, the body as JSON, or as text when it is not JSON). A header given as
    None is left out."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    reply = http_request(f"http://127.0.0.1:{port}{path}", method, body, sent, timeout)
    return reply.status, reply.json_or_text()


def post(port: int, path: str, body: bytes | dict, **kw: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(port, "POST", path, data, **kw)


def is_error_body(reply: Any) -> bool:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return (
        isinstance(reply, dict)
        and set(reply) == {"error"}
        and isinstance(reply["error"], dict)
        and set(reply["error"]) == {"message", "type", "param", "code"}
        and isinstance(reply["error"]["message"], str)
        and bool(reply["error"]["message"])
    )
