"""A cheap test both HTTP front ends run on a JSON body before walking it for lone
UTF-16 surrogates (``"\\ud800"`` unpaired: no text; the tokenizer, the key hash and
UTF-8 writers all choke on it). A lone surrogate can only arrive as a ``\\u`` escape
(raw surrogate bytes are not valid UTF-8), so a body whose escapes all pair up, as
clients that escape every non-ASCII character write emoji, is never walked."""

from __future__ import annotations

import re

_HIGH, _LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_LONE = re.compile(rb"%s(?!%s)|(?<!%s)%s" % (_HIGH, _LOW, _HIGH, _LOW))


def may_hold_lone_surrogate(raw: bytes) -> bool:
    """False when ``raw`` (JSON) surely holds none; True when it may (an escaped
    backslash before ``ud800`` also matches: the exact check then decides)."""
    return _LONE.search(raw) is not None
