"""Raw HTTP for the server hardening tests: any bytes, any headers, nothing a client
library would tidy up first."""

from __future__ import annotations

import http.client
import json
from typing import Any


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str | None] | None = None, timeout: float = 60) -> tuple[int, Any]:  # fmt: skip
    """(status, the body as JSON, or as text when it is not JSON). A header given as
    None is left out."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        chunked = sent.get("Transfer-Encoding") == "chunked"
        conn.request(method, path, body, {k: v for k, v in sent.items() if v is not None},
                     encode_chunked=chunked)  # fmt: skip
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode(errors="replace")


def post(port: int, path: str, body: bytes | dict, **kw: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(port, "POST", path, data, **kw)


def is_error_body(reply: Any) -> bool:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return (isinstance(reply, dict) and set(reply) == {"error"}
            and isinstance(reply["error"], dict)
            and set(reply["error"]) == {"message", "type", "param", "code"}
            and isinstance(reply["error"]["message"], str) and bool(reply["error"]["message"]))  # fmt: skip
