"""The one bearer-key check of the HTTP front ends (``engine serve``, ``kvrouter``), as
vLLM's ``--api-key``: every route but the probes needs ``Authorization: Bearer <key>``.

Here, at the bottom of the packages, so both servers share it without the router
importing the engine (and torch)."""

from __future__ import annotations

import hmac

API_KEY_ENV = "KVSTORE_API_KEY"
"""The environment variable both ``engine serve`` and ``kvrouter`` read the key from."""

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Routes that need no key: probes and scrapers carry none."""


def bearer_matches(header: str, expected: bytes) -> bool:
    """Whether an ``Authorization`` header value carries the key ``expected``: scheme
    ``Bearer`` in any case, the token without surrounding spaces, compared in constant
    time (the time taken does not tell how much of a guess was right). Header values
    arrive as str with undecodable bytes escaped: they are compared as bytes again."""
    scheme, _, token = header.partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, expected)
