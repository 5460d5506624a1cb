"""Every constant of the daemon's protocol, defined once for both ends.

Why one module: client, server, remote tier and CLI each used to spell the default port,
the transport names, the pool marker or the window alignment themselves, and a value
changed on one side only is a protocol break that no test of one side sees.
"""

from __future__ import annotations

TRANSPORTS = ("auto", "shm", "stream", "grpc", "ucx")
"""A client's bulk paths (``KVStoreClient(transport=...)``, ``remote.transport``)."""

DEFAULT_PORT = 50051
"""The daemon's gRPC port, and a ``kvstore://host`` url's port when it names none."""
DEFAULT_URL = f"kvstore://127.0.0.1:{DEFAULT_PORT}"

CLIENT_HEADER = "x-kvstore-client"
"""gRPC metadata naming the client (``host:pid``): metrics labels, lease quotas."""

IN_POOL = -1
"""A region get row's offset when its payload lies in the daemon's shared pool (the
client reads it through its own read-only mapping of the pool)."""

WINDOW_START = 64
"""A client's region: payloads start past the nonce, at this (cache-line aligned) offset."""

ALIGNMENT = 64
"""Payloads in a window start on 64-byte boundaries (cache lines, aligned copies)."""


def aligned(n: int) -> int:
    """``n`` rounded up to ALIGNMENT."""
    return -(-n // ALIGNMENT) * ALIGNMENT


PART_BYTES = 4 << 20
"""A get is answered in parts of about this many payload bytes, so the client copies
one part out while the daemon fetches the next."""

CLIENT_MAX_REGION_BYTES = 1 << 30
"""The largest region a client grows to; past it, a get finishes on the socket."""
MAX_REGION_BYTES = 1 << 34
"""The largest client region the daemon attaches (16 GiB; INVALID_ARGUMENT past it)."""

RELEASE_TIMEOUT = 30.0
"""Seconds a client may take to copy a get's chunks out of the shared pool."""
UCX_HANDSHAKE_TIMEOUT = 10.0
"""Seconds the daemon gives a client to connect its end of a UCX connection."""
HELLO_TIMEOUT = 5.0
"""Seconds from accept to a successful ``hello`` (``--handshake-timeout``)."""
MAX_CONNECTIONS = 1024
"""Open stream connections at most (``--max-connections``)."""

MAX_BATCH = 4096
"""Keys or chunks in one request (``--max-batch``)."""
MAX_CHUNK_BYTES = 64 << 20
"""One chunk's payload (``--max-chunk-size``)."""
MAX_REQUEST_BYTES = 256 << 20
"""Payload bytes of one put (``--max-request-size``)."""
