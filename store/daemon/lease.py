"""Leases: chunks pinned against eviction until released or until a deadline.

A prefill node (``kv_role`` producer) saves a prompt's chunks into the daemon the decode
node reads, then leases them so that eviction cannot drop them before the decode node
has loaded them. The decode node releases the lease when its request finishes; a lease
nobody releases (the decode node died, the router never sent the decode leg) ends at
its expiry time, when a reaper thread unpins it. Pins are counted per key in the
store's tiers (``TieredStore.pin``), so overlapping leases and readers compose.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_TTL = 600.0  # seconds: a lease is a hand-off between two nodes, not storage


@dataclass(slots=True)
class Lease:
    keys: list[str]
    expires_at: float  # time.time()


class LeaseTable:
    """Leases over ``pin`` / ``unpin`` (a ``TieredStore``'s) with a reaper thread."""

    def __init__(self, pin: Callable[[Sequence[str]], None],
                 unpin: Callable[[Sequence[str]], None], tick: float = 0.1) -> None:  # fmt: skip
        self._pin, self._unpin = pin, unpin
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tick = tick
        self._thread = threading.Thread(target=self._reap_loop, name="kvstore-leases", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._leases)

    def lease(self, keys: Sequence[str], ttl: float, stored: Callable[[], int]) -> tuple[str, int, float]:
        """Pin ``keys``, then keep the pins of the leading ``stored()`` of them (pinning
        first: nothing can be evicted between the lookup and the pin). Returns
        ``(lease_id, count, expires_at)``; ``("", 0, 0.0)`` when none is stored."""
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl_seconds must be in (0, {MAX_TTL:g}], got {ttl}")
        keys = list(keys)
        self._pin(keys)
        try:
            count = stored()
        except BaseException:
            self._unpin(keys)
            raise
        if count < len(keys):
            self._unpin(keys[count:])
        if count == 0:
            return "", 0, 0.0
        lease_id, expires = secrets.token_hex(12), time.time() + ttl
        with self._lock:
            self._leases[lease_id] = Lease(keys[:count], expires)
        return lease_id, count, expires

    def release(self, lease_id: str) -> bool:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._unpin(lease.keys)
        return True

    def expire(self, now: float | None = None) -> int:
        """Unpin every lease past its expiry; how many ended."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [i for i, lease in self._leases.items() if lease.expires_at <= now]
            ended = [self._leases.pop(i) for i in gone]
        for lease in ended:
            self._unpin(lease.keys)
        return len(ended)

    def close(self) -> None:
        """Stop the reaper and drop every lease (unpinned)."""
        self._stop.set()
        with self._lock:
            ended, self._leases = list(self._leases.values()), {}
        for lease in ended:
            self._unpin(lease.keys)

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._tick):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - the reaper must keep running
                pass
