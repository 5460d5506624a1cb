"""Chat messages -> prompt text: the checkpoint's chat template, or a plain one.

A checkpoint directory's template comes from ``tokenizer_config.json`` (``chat_template``,
a string or a list of named templates) or a ``chat_template.jinja`` file beside it, and is
rendered as HF transformers renders it: a sandboxed jinja2 environment with
``trim_blocks`` / ``lstrip_blocks``, ``raise_exception`` and a JSON ``tojson``. Presets
(and checkpoints without a template) use the plain template::

    system: You are terse.
    user: Hello
    assistant:
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.server.protocol import ApiError


class ChatTemplateError(Exception):
    """The checkpoint's template cannot be loaded (bad file, jinja2 missing)."""


class ChatTemplate:
    """Renders a conversation into the prompt the model continues with its reply."""

    def __init__(
        self,
        source: str | None = None,
        special_tokens: dict[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        self.source = source  # jinja2 text; None: the plain template
        self.special_tokens = dict(special_tokens or {})
        self._error = error  # why the checkpoint's template cannot render
        self._compiled: Any = None

    @classmethod
    def for_model(cls, model: str) -> ChatTemplate:
        """The template of checkpoint directory ``model``, plain for a preset or none."""
        path = Path(model)
        if not path.is_dir():
            return cls()
        config = _read_json(path / "tokenizer_config.json")
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if not source and jinja_file.is_file():
            source = jinja_file.read_text()
        if not source:
            return cls()
        if not isinstance(source, str):
            raise ChatTemplateError(f"{path / 'tokenizer_config.json'}: chat_template is not text")
        tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        try:
            import jinja2  # noqa: F401
        except ImportError:
            return cls(
                source, tokens, "this checkpoint's chat template needs jinja2 (pip install jinja2)"
            )
        template = cls(source, tokens)
        template._compile()
        return template

    @property
    def is_plain(self) -> bool:
        return self.source is None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages`` with the assistant's turn opened."""
        if self.source is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        if self._error is not None:
            raise ApiError(self._error, None, "chat_template_unavailable", 500, "server_error")
        import jinja2

        try:
            return self._compiled.render(
                messages=messages, add_generation_prompt=True, **self.special_tokens
            )
        except jinja2.TemplateError as e:  # raise_exception() in the template, bad roles
            raise ApiError(f"chat template: {e}", "messages", "invalid_messages") from None

    def _compile(self) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self._compiled = env.from_string(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from None


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _token_text(token: Any) -> str:
    """A special token as tokenizer_config.json writes it: text or ``{"content": ...}``."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}
