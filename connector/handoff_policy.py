"""What a request's ``kv_transfer_params`` may ask of this engine, and its lease count.

``kv_transfer_params`` arrive with HTTP requests nobody authenticated. Unchecked, a
``remote_store`` makes the engine open connections to any host:port (and keep a client
for each), and ``lease_ttl`` with many requests pins a daemon's memory for minutes. So
an engine only calls stores on its allow-list, asks for leases of at most
``max_lease_ttl`` seconds, and holds at most ``max_outstanding_leases`` unexpired leases
(store config keys; docs/server.md, "Limits").

Allow-list entries are compared by host (case-insensitive, as written: no DNS lookup,
which would itself be a call to a host the request chose) and port, so
``kvstore://Host:1/`` and ``kvstore://host:1`` are one store; a match is replaced by
the url the engine was configured with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from store.client import parse_url

DEFAULT_LEASE_TTL = 30.0  # seconds a producer's KV stays pinned for the decode leg


def store_address(url: str) -> tuple[str, int]:
    """``(host, port)`` of a kvstore url, the host lower-cased (raises ValueError)."""
    addr = parse_url(url)
    return addr.host.lower(), addr.port


@dataclass(frozen=True, slots=True)
class HandOffPolicy:
    """An engine's limits on ``kv_transfer_params`` (from its store config)."""

    allowed: Mapping[tuple[str, int], str]  # address -> the url to call it by
    max_ttl: float  # max_lease_ttl
    max_leases: int  # max_outstanding_leases

    @classmethod
    def of(cls, config: Any, own_urls: Sequence[str]) -> HandOffPolicy:
        """The policy of a ``StoreConfig``: the engine's own daemon urls (its remote
        tier) and ``allowed_remote_stores`` are allowed; own urls win a tie."""
        allowed = {store_address(u): u for u in config.allowed_remote_stores}
        allowed.update({store_address(u): u for u in own_urls})
        return cls(allowed, config.max_lease_ttl, config.max_outstanding_leases)

    def store_url(self, url: str) -> str | None:
        """The configured url of store ``url`` if it is on the allow-list, else None."""
        try:
            return self.allowed.get(store_address(url))
        except ValueError:
            return None

    def lease_ttl(self, asked: Any) -> float:
        """The lease a request gets: what it asked (checked before) or the default,
        never longer than ``max_ttl``."""
        return min(float(asked or DEFAULT_LEASE_TTL), self.max_ttl)


class LeaseLedger:
    """This engine's leases that may still pin a daemon: counted until they expire (a
    consumer on another node releases them without telling this one) or until this
    engine releases them itself. Thread-safe: hand-offs finish on worker threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._expiry: dict[str, float] = {}  # lease id -> expires at (unix time)
        self._pending = 0  # reserved: leases being asked for right now
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        """Claim room for one lease (then ``settle`` it); False at the limit."""
        with self._lock:
            if len(self._expiry) + self._pending >= self.limit:
                now = time.time()  # drop the expired only when full: O(limit), rarely
                self._expiry = {i: t for i, t in self._expiry.items() if t > now}
                if len(self._expiry) + self._pending >= self.limit:
                    return False
            self._pending += 1
            return True

    def settle(self, lease_id: str | None, expires_at: float | None) -> None:
        """End a ``reserve``: record the lease granted, if one was."""
        with self._lock:
            self._pending -= 1
            if lease_id and expires_at:
                self._expiry[lease_id] = expires_at

    def forget(self, lease_id: str) -> None:
        """A lease of ours was released."""
        with self._lock:
            self._expiry.pop(lease_id, None)
