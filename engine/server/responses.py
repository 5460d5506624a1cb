"""Response bodies in OpenAI's shapes (completions, chat, their stream chunks), plus the
``kv`` block: how many prompt tokens were reused and where they came from.

``usage.prompt_tokens_details.cached_tokens`` counts every reused prompt token: the
engine's own prefix cache plus what the KV connector loaded from its store tiers.
``kv.sources`` splits that count (``{"engine": 32, "remote": 224}``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import RequestOutput


@dataclass(slots=True)
class Reply:
    """What every body of one request shares."""

    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def full(self, out: RequestOutput) -> dict[str, Any]:
        """The non-streaming body of finished ``out``."""
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": out.text,
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
        body = {
            **self._head(self.object),
            "choices": [choice],
            "usage": usage(out),
            "kv": kv_block(out),
        }
        if out.kv_transfer_params is not None:  # a prefill leg's KV handle (vLLM's field)
            body["kv_transfer_params"] = out.kv_transfer_params
        return body

    def chunk(
        self,
        text: str,
        finish_reason: str | None = None,
        first: bool = False,
        out: RequestOutput | None = None,
    ) -> dict[str, Any]:
        """One stream chunk carrying ``text``; the last one has ``finish_reason`` (and
        ``out``'s kv block)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = {
            **self._head(self.object + ".chunk" if self.chat else self.object),
            "choices": [choice],
        }
        if out is not None:
            body["kv"] = kv_block(out)
            if out.kv_transfer_params is not None:
                body["kv_transfer_params"] = out.kv_transfer_params
        return body

    def usage_chunk(self, out: RequestOutput) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``: no choices."""
        kind = self.object + ".chunk" if self.chat else self.object
        return {**self._head(kind), "choices": [], "usage": usage(out), "kv": kv_block(out)}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def cached_tokens(out: RequestOutput) -> int:
    return sum(out.metrics.kv_sources.values())


def usage(out: RequestOutput) -> dict[str, Any]:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens(out)},
    }


def kv_block(out: RequestOutput) -> dict[str, Any]:
    sources = {k: v for k, v in out.metrics.kv_sources.items() if v > 0}
    return {"cached_tokens": cached_tokens(out), "sources": sources}


class TextDeltas:
    """Turns the cumulative text of successive outputs into stream deltas.

    Two things may still change the tail of a running request's text, so it is held back
    until they resolve: an incomplete UTF-8 sequence (decoded as U+FFFD) and a partial
    stop string (a full one ends the request and the engine cuts the text before it).
    """

    def __init__(self, stop: list[str]) -> None:
        self.sent = ""
        self.stop = list(stop)

    def next(self, text: str, finished: bool) -> str:
        if not finished:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._partial_stop(text)]
        if not text.startswith(self.sent):  # cannot take back what was sent
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins a stop string."""
        return max(
            (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
