"""Chunks handed out in place of copies: lent hits and reserved pages of the first tier.

The daemon serves hits from its first tier (a host ``cpu`` pool) without copying them
out: it borrows the pages, sends or maps them, and gives them back; and it receives new
chunks straight into reserved pages, then commits them. Only the first tier's pool can
do this (``Lends`` / ``Reserves`` in backends/capabilities.py), so the checks are made
once here, at construction (a runtime-protocol ``isinstance`` costs microseconds), and
every call either uses the pool or answers "not this way" (None: ``get`` / ``put`` it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from backends.capabilities import Lends, Reserves
from store.metrics import StoreMetrics
from store.tier_io import Emit, Tier


class Lending:
    """Borrow, lend, reserve and commit against the first of ``tiers``, where it can."""

    def __init__(self, tiers: list[Tier], metrics: StoreMetrics, emit: Emit) -> None:
        self.tiers = tiers
        self.metrics = metrics
        self.emit = emit
        first = tiers[0] if tiers else None
        # A tier that verifies reads does not lend: a lent page is not checked.
        lends = first is not None and not first.verify and isinstance(first.backend, Lends)
        self.lender = first.backend if lends else None
        reserves = first is not None and isinstance(first.backend, Reserves)
        self.reserver = first.backend if reserves else None

    def lend_first(self, method: str, keys: Sequence[str]) -> list[Any]:
        """``borrow`` or ``lend`` (``method``) of the first tier, its hits counted."""
        lender = self.lender
        if lender is None:
            return [None] * len(keys)
        tier = self.tiers[0]
        start = time.perf_counter()
        lent = lender.lend(keys) if method == "lend" else lender.borrow(keys)
        hits = [h for h in lent if h is not None]
        self.metrics.hits.labels(tier.name).inc(len(hits))
        self.metrics.bytes_read.labels(tier.name).inc(sum(h[0].nbytes for h in hits))
        self.metrics.latency.labels(tier.name, "get").observe(time.perf_counter() - start)
        return lent

    def shared_pool(self) -> Any:
        return None if self.lender is None else self.lender.shared

    def give_back(self, keys: Sequence[str]) -> None:
        if keys:
            self.tiers[0].backend.unpin(keys)

    def can_reserve(self) -> bool:
        """The first tier reserves and no lower tier is written through (a reserved chunk
        reaches the first tier only, so a write-through tier would miss it)."""
        return self.reserver is not None and all(
            t.write_policy != "write_through" for t in self.tiers[1:]
        )

    def reserve(self, headers: Sequence[Any]) -> list[list[Any] | None]:
        if self.reserver is None or not self.can_reserve():
            return [None] * len(headers)
        return self.reserver.reserve(headers)

    def commit(self, headers: Sequence[Any], ok: Sequence[bool]) -> list[bool]:
        """Publish the reserved chunks whose ``ok`` is true; count and announce them."""
        tier = self.tiers[0]
        assert self.reserver is not None, "commit without reserve"
        stored = self.reserver.commit(headers, ok)
        done = [h for h, good in zip(headers, stored, strict=True) if good]
        self.metrics.bytes_written.labels(tier.name).inc(sum(h.nbytes for h in done))
        self.emit(tier, [h.key for h in done], False)
        return stored
