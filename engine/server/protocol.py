"""Request bodies of the OpenAI-compatible API, checked field by field.

Every problem is an :class:`ApiError` naming the field (``param``), which the app turns
into HTTP 400 with OpenAI's error body. Fields this server does not know are ignored,
as OpenAI clients send more than a small server implements; fields it knows but cannot
honour (``n > 1``, ``logprobs``, ``echo``) are refused rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from engine.sampling_params import SEED_MAX, SEED_MIN, SamplingParams

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Stop conditions are checked at every step (engine) and every stream chunk (event loop):
# bounded so that no request makes either slow for everyone (OpenAI allows 4 strings).
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 256, 256


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = (
            message,
            param,
            code,
            status,
            type,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What both endpoints share once checked. ``prompt`` is text or token ids for
    completions, ``None`` for chat (``messages`` then holds the conversation)."""

    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    cache_salt: str | None
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated prefill/decode legs
    # the field that set params.max_tokens; None: the default, cut to the room left
    max_tokens_param: str | None = None


_MISSING = object()


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = _MISSING) -> Any:
    """``body[name]`` if it has one of ``kinds`` (``None`` means absent)."""
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise ApiError(f"'{name}' is a required property", name, "missing_required_parameter")
        return default
    numeric = int in kinds or float in kinds
    if not isinstance(value, kinds) or (numeric and isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(f"'{name}' must be {names}, got {_json_type(value)}", name, "invalid_type")
    return value


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def _json_type(value: Any) -> str:
    kinds = (bool, int, float, str, list, dict)  # bool first: it is an int too
    return next((_KIND_NAMES[k] for k in kinds if isinstance(value, k)), type(value).__name__)


def _check_body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", None, "invalid_body")
    return body


def _check_model(body: dict, served: str) -> str:
    model = _field(body, "model", (str,))
    if model != served:
        raise ApiError(
            f"the model '{model}' does not exist; this server serves '{served}'",
            "model",
            "model_not_found",
        )
    return model


def _unsupported(body: dict) -> None:
    n = _field(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(f"'n' must be 1 (got {n}): one choice per request", "n", "unsupported")
    if body.get("echo"):
        raise ApiError("'echo' is not supported", "echo", "unsupported")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError("'logprobs' is not supported", "logprobs", "unsupported")
    if body.get("best_of") not in (None, 1):
        raise ApiError("'best_of' must be 1", "best_of", "unsupported")


def _stops(body: dict) -> tuple[list[str], list[int]]:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(
            "'stop' must be a string or an array of non-empty strings", "stop", "invalid_type"
        )
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(
            f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most "
            f"{MAX_STOP_CHARS} characters",
            "stop",
            "invalid_value",
        )
    stop_ids = _field(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise ApiError(
            "'stop_token_ids' must be an array of integers", "stop_token_ids", "invalid_type"
        )
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise ApiError(
            f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids",
            "stop_token_ids",
            "invalid_value",
        )
    return stop, stop_ids


def _seed(body: dict) -> int | None:
    seed = _field(body, "seed", (int,), None)
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise ApiError(
            f"'seed' must be in [{SEED_MIN}, {SEED_MAX}] (a signed 64-bit integer)",
            "seed",
            "invalid_value",
        )
    return seed


def _sampling(body: dict, max_tokens: int) -> SamplingParams:
    stop, stop_ids = _stops(body)
    temperature = _field(body, "temperature", (int, float), 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(
            f"'temperature' must be in [0, 2], got {temperature}", "temperature", "invalid_value"
        )
    top_p = _field(body, "top_p", (int, float), 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"'top_p' must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    top_k = _field(body, "top_k", (int,), 0)
    if top_k < 0:
        raise ApiError(f"'top_k' must be >= 0, got {top_k}", "top_k", "invalid_value")
    try:
        return SamplingParams(
            temperature=float(temperature),
            top_k=top_k,
            top_p=float(top_p),
            max_tokens=max_tokens,
            seed=_seed(body),
            stop=stop,
            stop_token_ids=stop_ids,
            ignore_eos=_field(body, "ignore_eos", (bool,), False),
        )
    except InvalidRequestError as e:
        raise ApiError(str(e), None, "invalid_value") from None


def _max_tokens(body: dict, names: tuple[str, ...], default: int) -> tuple[int, str | None]:
    """The first of ``names`` the body sets and its value, or ``default`` and None."""
    for name in names:
        value = _field(body, name, (int,), None)
        if value is not None:
            if value < 1:
                raise ApiError(f"'{name}' must be at least 1, got {value}", name, "invalid_value")
            return value, name
    return default, None


def _common(body: dict, served: str) -> dict[str, Any]:
    _check_model(body, served)
    _unsupported(body)
    options = _field(body, "stream_options", (dict,), {})
    salt = _field(body, "cache_salt", (str,), None)
    if salt == "":
        raise ApiError("'cache_salt' must be a non-empty string", "cache_salt", "invalid_value")
    kv = _field(body, "kv_transfer_params", (dict,), None)
    if kv is not None:
        from connector.disagg import check_params

        why = check_params(kv)
        if why is not None:
            raise ApiError(why, "kv_transfer_params", "invalid_value")
    return {
        "model": served,
        "stream": _field(body, "stream", (bool,), False),
        "include_usage": bool(options.get("include_usage")),
        "cache_salt": salt,
        "kv_transfer_params": kv,
    }


def parse_completion(body: Any, served: str) -> GenerationRequest:
    """A ``/v1/completions`` body: one prompt (text or token ids)."""
    body = _check_body(body)
    common = _common(body, served)
    prompt = _prompt(_field(body, "prompt", (str, list)))
    max_tokens, given = _max_tokens(body, ("max_tokens",), 16)
    return GenerationRequest(
        params=_sampling(body, max_tokens), prompt=prompt, max_tokens_param=given, **common
    )


def _prompt(prompt: str | list) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError("'prompt' must not be empty", "prompt", "invalid_value")
        return prompt
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ApiError(
            "'prompt' must be a string, an array of token ids, or an array holding "
            "one of those (one prompt per request)",
            "prompt",
            "invalid_type",
        )
    return list(prompt)


def parse_chat(body: Any, served: str, max_model_len: int) -> GenerationRequest:
    """A ``/v1/chat/completions`` body. Without ``max_tokens`` a reply may run to the end
    of the context (``max_model_len`` here, cut to the room the prompt leaves later)."""
    body = _check_body(body)
    common = _common(body, served)
    messages = [_message(m, i) for i, m in enumerate(_field(body, "messages", (list,)))]
    if not messages:
        raise ApiError("'messages' must not be empty", "messages", "invalid_value")
    limit, given = _max_tokens(body, ("max_completion_tokens", "max_tokens"), max_model_len)
    return GenerationRequest(
        params=_sampling(body, limit), messages=messages, max_tokens_param=given, **common
    )


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(f"'{where}' must be an object", where, "invalid_type")
    role = _field(m, "role", (str,), None)
    if role not in CHAT_ROLES:
        raise ApiError(
            f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
            f"{where}.role",
            "invalid_value",
        )
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise ApiError(
                f"'{where}.content' parts must be text parts", f"{where}.content", "invalid_type"
            )
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(
            f"'{where}.content' must be a string or an array of text parts",
            f"{where}.content",
            "invalid_type",
        )
    return {"role": role, "content": content}
