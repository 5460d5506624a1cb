"""A request's prompt as token ids and block hashes, for the prefix-aware policy.

Hashes come from the one key module (``kvcore/keys.py``) so they equal the engine's. Text
is tokenized with the model's tokenizer (``--tokenizer``: a preset name such as ``tiny``
or ``bench``, a checkpoint directory, or a ``tokenizer.json``); prompts given as token
ids need none. Without a tokenizer a text prompt has no hashes and the policy balances
load alone.

Only a prompt's first ``max_tokens`` tokens are hashed (``--route-prefix-tokens``), and of
a text only its first ``CHARS_PER_TOKEN * max_tokens`` characters are tokenized: past a
few thousand tokens, a longer shared prefix hardly changes where a request should go, and
the router's cost per request stays bounded however long the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcore.keys import BlockHash, block_hashes

CHARS_PER_TOKEN = 4  # of a text, at most this many characters per hashed token are read
DEFAULT_PREFIX_TOKENS = 16384


def load_tokenizer(spec: str):
    """The engine's ``Tokenizer`` for a preset name, checkpoint directory or tokenizer file."""
    from engine.tokenizer import Tokenizer

    path = Path(spec)
    if path.is_dir():
        return Tokenizer.from_file(path / "tokenizer.json")
    if path.is_file():
        return Tokenizer.from_file(path)
    from engine.presets import PRESETS, preset_tokenizer

    if spec not in PRESETS:
        raise ValueError(
            f"tokenizer {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a path"
        )
    return preset_tokenizer(PRESETS[spec])


def render_chat(messages: Sequence[dict[str, Any]], max_chars: int | None = None) -> str:
    """Chat messages as the prompt text ``engine serve`` renders for presets and
    checkpoints without a chat template (``engine/server/chat.py``'s plain template).

    With another template the hashes of a chat request are approximate: a conversation's
    later turns still extend its earlier turns, so the router still keeps it together.
    With ``max_chars``, rendering stops once that many characters are there.
    """
    parts, size = [], 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', '')}: {content or ''}\n")
        size += len(parts[-1])
        if max_chars is not None and size > max_chars:
            return "".join(parts)
    return "".join(parts) + "assistant:"


class PromptHasher:
    """Block hashes of the first ``max_tokens`` tokens of completion and chat requests."""

    def __init__(
        self, block_size: int, tokenizer=None, max_tokens: int = DEFAULT_PREFIX_TOKENS
    ) -> None:
        self.block_size = block_size
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def token_ids(self, body: dict[str, Any], chat: bool) -> list[int] | None:
        """The first ``max_tokens`` token ids of the prompt (the first prompt of a batch),
        or None if unknown."""
        if chat:
            return self._encode(render_chat(body.get("messages") or [], self._max_chars))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch: route by its first prompt
        if isinstance(prompt, str):
            return self._encode(prompt)
        if isinstance(prompt, list):
            ids = prompt[: self.max_tokens]
            return ids if all(isinstance(t, int) for t in ids) else None
        return None

    def hashes(self, body: dict[str, Any], chat: bool) -> list[BlockHash]:
        ids = self.token_ids(body, chat)
        if not ids:
            return []
        salt = body.get("cache_salt")
        return block_hashes(
            ids, self.block_size, cache_salt=salt if isinstance(salt, str) else None
        )

    @property
    def _max_chars(self) -> int:
        return CHARS_PER_TOKEN * self.max_tokens

    def _encode(self, text: str) -> list[int] | None:
        if self.tokenizer is None or not text:
            return None
        if len(text) <= self._max_chars:
            return self.tokenizer.encode(text)[: self.max_tokens]
        ids = self.tokenizer.encode(text[: self._max_chars])
        # The cut may split a word, whose tokens then differ from the whole text's: drop
        # the tail they can be in, so every hash sent to the policy is one the engine has.
        return ids[: min(self.max_tokens, max(0, len(ids) - self.block_size))]
