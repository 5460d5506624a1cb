"""Leases: chunks pinned against eviction until released or until a deadline.

A prefill node (``kv_role`` producer) saves a prompt's chunks into the daemon the decode
node reads, then leases them so that eviction cannot drop them before the decode node
has loaded them. The decode node releases the lease when its request finishes; a lease
nobody releases (the decode node died, the router never sent the decode leg) ends at
its expiry time, when a reaper thread unpins it. Pins are counted per key in the
store's tiers (``TieredStore.pin``), so overlapping leases and readers compose.

A lease is asked for on behalf of an HTTP request nobody authenticated, so what leases
may pin is capped (``LeaseLimits``): a TTL, a lease count and leased bytes per client,
and leased bytes over all clients. A lease over a cap is refused whole
(``LeaseRefused``, gRPC RESOURCE_EXHAUSTED); the decode node then recomputes. Bytes are
counted per lease, so a chunk in two leases counts twice: the caps are upper bounds on
what is pinned, never exceeded by overlap.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from store.config import MAX_LEASE_TTL as MAX_TTL

SIZED_TIERS = ("gpu", "cpu", "disk", "gds")  # tiers with a byte budget (``size``)


class LeaseRefused(Exception):
    """A lease over one of the ``LeaseLimits`` (RESOURCE_EXHAUSTED): nothing pinned."""


@dataclass(frozen=True, slots=True)
class LeaseLimits:
    """What leases may pin (store config keys ``max_lease_ttl``, ``max_leases_per_client``,
    ``max_lease_bytes_per_client``, ``max_lease_bytes``; None: no byte cap)."""

    max_ttl: float = 60.0
    per_client: int = 256
    client_bytes: int | None = None
    total_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.max_ttl <= MAX_TTL:
            raise ValueError(f"max_lease_ttl must be in (0, {MAX_TTL:g}], got {self.max_ttl}")
        if self.per_client < 1:
            raise ValueError(f"max_leases_per_client must be >= 1, got {self.per_client}")

    @classmethod
    def from_config(cls, config: Any) -> LeaseLimits:
        """The limits of a ``StoreConfig``: byte caps left unset are a quarter (per
        client) and a half (all clients) of the first tier's size, when it has one."""
        first = config.tiers[0]
        size = config.tier(first).size if first in SIZED_TIERS else None
        quarter, half = (None, None) if size is None else (size // 4, size // 2)
        return cls(
            config.max_lease_ttl,
            config.max_leases_per_client,
            config.max_lease_bytes_per_client or quarter,
            config.max_lease_bytes or half,
        )


def payload_bytes(size_of: Callable[[str], int | None], keys: Sequence[str]) -> int:
    """Payload bytes of ``keys`` by ``size_of`` (the daemon's index of recent sizes). A
    key it does not know counts as the largest one it does (a prompt's chunks are one
    size); none known counts 0, and the lease count still bounds such leases."""
    sizes = [size_of(k) for k in keys]
    fill = max((n for n in sizes if n is not None), default=0)
    return sum(fill if n is None else n for n in sizes)


@dataclass(slots=True)
class Lease:
    keys: list[str]
    expires_at: float  # time.time()
    client: str = ""
    nbytes: int = 0


class LeaseTable:
    """Leases over ``pin`` / ``unpin`` (a ``TieredStore``'s) with a reaper thread."""

    def __init__(
        self,
        pin: Callable[[Sequence[str]], None],
        unpin: Callable[[Sequence[str]], None],
        tick: float = 0.1,
        limits: LeaseLimits | None = None,
    ) -> None:
        self._pin, self._unpin = pin, unpin
        self.limits = limits or LeaseLimits()
        self._leases: dict[str, Lease] = {}
        self._count: Counter[str] = Counter()  # client -> leases held
        self._bytes: Counter[str] = Counter()  # client -> bytes leased
        self._total_bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tick = tick
        self._thread = threading.Thread(target=self._reap_loop, name="kvstore-leases", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._leases)

    def lease(
        self,
        keys: Sequence[str],
        ttl: float,
        stored: Callable[[], int],
        client: str = "",
        size: Callable[[Sequence[str]], int] | None = None,
    ) -> tuple[str, int, float]:
        """Pin ``keys``, then keep the pins of the leading ``stored()`` of them (pinning
        first: nothing can be evicted between the lookup and the pin). ``size(keys)``:
        their payload bytes, counted against ``client``'s caps. Returns ``(lease_id,
        count, expires_at)``; ``("", 0, 0.0)`` when none is stored. Raises ValueError for
        a TTL out of range, ``LeaseRefused`` (nothing pinned) over a cap."""
        if not 0 < ttl <= self.limits.max_ttl:
            raise ValueError(
                f"ttl_seconds must be in (0, {self.limits.max_ttl:g}] (this daemon's "
                f"max_lease_ttl), got {ttl}"
            )
        keys = list(keys)
        self._pin(keys)
        try:
            count = stored()
            nbytes = size(keys[:count]) if size is not None and count else 0
        except BaseException:
            self._unpin(keys)
            raise
        if count < len(keys):
            self._unpin(keys[count:])
        if count == 0:
            return "", 0, 0.0
        lease_id, expires = secrets.token_hex(12), time.time() + ttl
        with self._lock:
            why = self._over_limit(client, nbytes)
            if why is None:
                self._leases[lease_id] = Lease(keys[:count], expires, client, nbytes)
                self._count[client] += 1
                self._bytes[client] += nbytes
                self._total_bytes += nbytes
        if why is not None:
            self._unpin(keys[:count])
            raise LeaseRefused(why)
        return lease_id, count, expires

    def _over_limit(self, client: str, nbytes: int) -> str | None:
        """Why one more lease of ``nbytes`` for ``client`` breaks a cap (lock held)."""
        lim = self.limits
        if self._count[client] >= lim.per_client:
            return f"client {client[:64]!r} holds {lim.per_client} leases (max_leases_per_client)"
        if lim.client_bytes is not None and self._bytes[client] + nbytes > lim.client_bytes:
            return (
                f"client {client[:64]!r} would lease {self._bytes[client] + nbytes} bytes, "
                f"over max_lease_bytes_per_client {lim.client_bytes}"
            )
        if lim.total_bytes is not None and self._total_bytes + nbytes > lim.total_bytes:
            return (
                f"leases would pin {self._total_bytes + nbytes} bytes, over "
                f"max_lease_bytes {lim.total_bytes}"
            )
        return None

    def _forget(self, lease: Lease) -> None:
        """Drop ``lease``'s share of its client's counts (lock held)."""
        self._count[lease.client] -= 1
        self._bytes[lease.client] -= lease.nbytes
        self._total_bytes -= lease.nbytes
        if self._count[lease.client] <= 0:  # clients come and go: keep no empty entries
            del self._count[lease.client], self._bytes[lease.client]

    def held_by(self, client: str) -> tuple[int, int]:
        """``(leases, bytes)`` that ``client`` holds."""
        with self._lock:
            return self._count.get(client, 0), self._bytes.get(client, 0)

    def release(self, lease_id: str) -> bool:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._forget(lease)
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
                self._forget(lease)
        for lease in ended:
            self._unpin(lease.keys)
        return len(ended)

    def close(self) -> None:
        """Stop the reaper and drop every lease (unpinned)."""
        self._stop.set()
        with self._lock:
            ended, self._leases = list(self._leases.values()), {}
            self._count.clear()
            self._bytes.clear()
            self._total_bytes = 0
        for lease in ended:
            self._unpin(lease.keys)

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._tick):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - the reaper must keep running
                pass
