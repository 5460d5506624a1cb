"""A client's request from bytes to a checked body and its block hashes, at bounded cost.

The body is refused (413) past ``max_body_bytes`` before it is all read when it says its
length, and as soon as it grows past that otherwise. Parsing, checking, tokenizing and
hashing a body of more than ``INLINE_BYTES`` run on a small thread pool of their own, so
one big prompt never holds up the event loop that routes every other request; a small
body (the common case) is handled inline, where a thread hop would cost more than the
work, and never waits behind big ones. The pool is not the loop's default executor,
which aiohttp also needs for DNS lookups.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from router.prompt import PromptHasher
from router.validate import check_chat, check_completion, parse_body

INLINE_BYTES = 4096  # parsing + tokenizing this much takes well under a millisecond
WORKERS = 2  # tokenizing holds the GIL for the most part: more threads would not help


class BodyTooLarge(Exception):
    """The request body is larger than the router accepts."""


class Intake:
    """Reads and prepares request bodies; ``close`` stops its threads."""

    def __init__(self, hasher: PromptHasher, max_body_bytes: int) -> None:
        self.hasher, self.max_body_bytes = hasher, max_body_bytes
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="kvrouter-intake")

    async def read(self, request: web.Request) -> bytes:
        """The whole body, or ``BodyTooLarge``."""
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise BodyTooLarge
        try:
            return await request.read()  # the app's client_max_size is max_body_bytes
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge from None

    async def prepare(
        self, raw: bytes, chat: bool, want_hashes: bool
    ) -> tuple[dict[str, Any], list[bytes]]:
        """(body, block hashes) of a request, or ``router.validate.BadRequest``."""
        if len(raw) <= INLINE_BYTES:
            return self._prepare(raw, chat, want_hashes)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._prepare, raw, chat, want_hashes)

    def _prepare(
        self, raw: bytes, chat: bool, want_hashes: bool
    ) -> tuple[dict[str, Any], list[bytes]]:
        body = parse_body(raw)
        (check_chat if chat else check_completion)(body)
        return body, self.hasher.hashes(body, chat) if want_hashes else []

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
