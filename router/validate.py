"""Checks on a client's request body before it goes anywhere: bad input is a 400 here."""

from __future__ import annotations

import json
from typing import Any


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def check_completion(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("'prompt' is required", "prompt")
    if not _is_prompt(prompt) and not (
        isinstance(prompt, list) and prompt and all(_is_prompt(p) for p in prompt)
    ):
        raise BadRequest(
            "'prompt' must be a string, a list of token ids, or a list of those", "prompt"
        )
    _check_common(body)


def check_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role'", "messages")
    _check_common(body)


def _is_prompt(p: Any) -> bool:
    if isinstance(p, str):
        return bool(p)
    return (
        isinstance(p, list)
        and bool(p)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    )


def _check_common(body: dict[str, Any]) -> None:
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise BadRequest(f"'{name}' must be a non-negative integer", name)
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise BadRequest("'cache_salt' must be a string", "cache_salt")
