"""Checks on a client's request body before it goes anywhere: bad input is a 400 here.

Whatever passes can be re-encoded as JSON, tokenized and hashed without an exception:
strict UTF-8, no lone surrogates (``"\\ud800"`` escapes), at most ``MAX_DEPTH`` levels.
"""

from __future__ import annotations

import json
from typing import Any

from kvcore.json_text import may_hold_lone_surrogate

# Deeper than any real request (a tool's JSON schema is the deepest, ~10 levels), and far
# below the recursion limit, so re-encoding a body the router accepted cannot overflow.
MAX_DEPTH = 100


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_body(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, or ``BadRequest``; O(len(raw)) in C but for rare shapes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(
            f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(
            f"the request body is nested too deeply (over {MAX_DEPTH} levels)"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    surrogates = may_hold_lone_surrogate(raw)
    if surrogates or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        _check_tree(body, surrogates)
    return body


def _no_constant(name: str) -> Any:
    raise BadRequest(f"the request body is not valid JSON: {name} is not a JSON number")


def _check_tree(body: Any, surrogates: bool) -> None:
    """Depth of lists and objects (and, when asked, lone surrogates in keys and strings)
    without recursion; strings are visited only when surrogates are looked for."""
    kinds = (dict, list, str) if surrogates else (dict, list)
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
            continue
        if depth > MAX_DEPTH:
            raise BadRequest(f"the request body is nested too deeply (over {MAX_DEPTH} levels)")
        if isinstance(node, dict):
            if surrogates:
                for key in node:
                    _check_text(key)
            node = node.values()
        stack.extend((v, depth + 1) for v in node if isinstance(v, kinds))


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"the request body holds a lone surrogate (\\u{ord(s[e.start]):04x}): "
            "a string must be valid Unicode"
        ) from None


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
        _check_content(i, m.get("content"))
    _check_common(body)


def _check_content(i: int, content: Any) -> None:
    """A message's content: a string, null, or a list of parts whose ``text`` is a string."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(f"messages[{i}].content must be a string or a list of parts", "messages")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text", ""), str):
            raise BadRequest(
                f"messages[{i}].content[{j}] must be an object whose 'text' is a string",
                "messages",
            )


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
