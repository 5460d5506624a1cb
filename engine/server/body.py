"""Reading a request body as JSON, refusing cheaply what cannot be a valid request.

Everything here costs at most one pass over a body already bounded in size: a body past
the limit is refused from its ``Content-Length`` before it is read (and aiohttp's
``client_max_size`` stops a chunked one at the limit), and the JSON parser's own failures
(nesting too deep, an integer of thousands of digits, ``NaN``) are answers, not crashes.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from engine.server.protocol import ApiError
from kvcore.json_text import may_hold_lone_surrogate


def too_large(limit: int) -> ApiError:
    return ApiError(
        f"the request body is larger than this server's limit of {limit} bytes "
        "(--max-request-body)",
        None,
        "request_too_large",
        413,
    )


async def read_json(request: web.Request, limit: int) -> Any:
    """The body of ``request`` parsed as JSON, or an :class:`ApiError` saying why not."""
    _check_content_type(request)
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError("the request body is nested too deeply", None, "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of > 4300 digits
        raise ApiError(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if may_hold_lone_surrogate(raw):
        _check_unicode(body)
    return body


def _check_content_type(request: web.Request) -> None:
    """JSON, or no type at all (``curl --data-binary``); a form or text is a client's slip."""
    if "Content-Type" not in request.headers:
        return
    kind = request.content_type
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(
            f"the request body must be application/json, got {kind}",
            None,
            "unsupported_media_type",
            415,
        )


def _no_constant(name: str) -> Any:
    raise ApiError(
        f"the request body is not valid JSON: {name} is not a JSON number", None, "invalid_json"
    )


def _check_unicode(body: Any) -> None:
    """Refuse a string holding a lone surrogate ("\\ud800" unpaired): it is no text, and the
    tokenizer, the key hash and UTF-8 writers all choke on it."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except RecursionError:
        raise ApiError("the request body is nested too deeply", None, "invalid_json") from None
    except UnicodeEncodeError:
        raise ApiError(
            "the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-"
            "\\udfff escape), which is not valid Unicode text",
            None,
            "invalid_unicode",
        ) from None
