"""``engine serve``'s own settings: the API key and the limits that keep one request cheap
to refuse (docs/server.md, "Security").

Two limits are derived from the model's context (``max_model_len``) unless set:

* the text limit: a text prompt (or a chat's rendered prompt) longer than
  ``max_model_len * max_chars_per_token`` characters cannot fit the context whatever it
  tokenizes to, so it is refused before it is tokenized;
* the body limit: ``1 MiB + 6 * text limit`` bytes, room for a prompt at the text limit
  written with JSON's six-byte ``\\uXXXX`` escapes (a token-id array needs ~8 bytes per id,
  far less). A larger body is refused (413) before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcore.bearer import API_KEY_ENV  # noqa: F401 - shared with kvrouter (engine/cli.py)
from store.config import ConfigError

BODY_SLACK = 1 << 20  # the JSON around the prompt: other fields, messages' roles, ...
ESCAPED_CHAR_BYTES = 6  # "\uXXXX"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of the HTTP layer (the engine's are ``EngineConfig``).

    ``api_key``: when set, every route but ``/health`` and ``/metrics`` needs
    ``Authorization: Bearer <api_key>``. ``max_request_body``: bytes (None: derived, see
    the module docstring). ``max_chars_per_token``: the bound on characters per token
    used for the text limit. ``tokenizer_threads``: worker threads that render chat
    templates and tokenize, off the event loop.
    """

    api_key: str | None = None
    max_request_body: int | None = None
    max_chars_per_token: int = 16
    tokenizer_threads: int = 2

    def __post_init__(self) -> None:
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ConfigError("api_key: must be non-empty, without leading or trailing spaces")
        if self.max_request_body is not None and self.max_request_body < 1024:
            raise ConfigError(
                f"max_request_body: must be at least 1024 bytes, got {self.max_request_body}"
            )
        if not 1 <= self.max_chars_per_token <= 1024:
            raise ConfigError(
                f"max_chars_per_token: must be in [1, 1024], got {self.max_chars_per_token}"
            )
        if not 1 <= self.tokenizer_threads <= 64:
            raise ConfigError(
                f"tokenizer_threads: must be in [1, 64], got {self.tokenizer_threads}"
            )

    def max_prompt_chars(self, max_model_len: int) -> int:
        """The longest text prompt worth tokenizing for a context of ``max_model_len``."""
        return max_model_len * self.max_chars_per_token

    def max_body_bytes(self, max_model_len: int) -> int:
        if self.max_request_body is not None:
            return self.max_request_body
        return BODY_SLACK + ESCAPED_CHAR_BYTES * self.max_prompt_chars(max_model_len)
