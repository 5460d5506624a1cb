"""Per-tier statistics, exported with prometheus-client on a registry owned by the store.

Each TieredStore has its own ``CollectorRegistry`` (no process-global metrics that
tests would have to reset); the daemon serves that registry on ``/metrics``.
Occupancy and evictions are read from the backends when scraped, not pushed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from backends.capabilities import CountsEvictions

_LATENCY_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class TierStats(NamedTuple):
    """One tier's counters and occupancy (``None`` where the medium cannot say)."""

    hits: int
    misses: int
    bytes_read: int
    bytes_written: int
    put_failures: int
    checksum_failures: int
    evictions: int
    items: int | None
    bytes_used: int | None
    bytes_capacity: int | None


class StoreMetrics:
    """Counters and histograms labelled by tier; ``tiers`` maps names to backends."""

    def __init__(
        self, tiers: Callable[[], dict[str, Any]], registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, t = self.registry, ["tier"]
        self.hits = Counter("kvstore_tier_hits", "Chunks found in a tier", t, registry=r)
        self.misses = Counter(
            "kvstore_tier_misses", "Chunks asked of a tier and not found", t, registry=r
        )
        self.bytes_read = Counter(
            "kvstore_tier_read_bytes", "Payload bytes read from a tier", t, registry=r
        )
        self.bytes_written = Counter(
            "kvstore_tier_written_bytes", "Payload bytes written to a tier", t, registry=r
        )
        self.put_failures = Counter(
            "kvstore_tier_put_failures", "Chunks a tier failed to store", t, registry=r
        )
        self.checksum_failures = Counter(
            "kvstore_tier_checksum_failures",
            "Objects dropped as corrupt, truncated or foreign (key/fingerprint/checksum mismatch)",
            t,
            registry=r,
        )
        self.latency = Histogram(
            "kvstore_tier_op_seconds",
            "Latency of one batched tier call",
            ["tier", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._tiers = tiers
        r.register(_OccupancyCollector(tiers))
        for name in tiers():  # every series from the start, at 0: no gaps in a dashboard
            for counter in (
                self.hits,
                self.misses,
                self.bytes_read,
                self.bytes_written,
                self.put_failures,
                self.checksum_failures,
            ):
                counter.labels(name)

    def snapshot(self, tier: str) -> TierStats:
        """Current figures of one tier."""
        backend = self._tiers()[tier]
        usage = backend.usage()

        def value(name: str) -> int:
            v = self.registry.get_sample_value(f"{name}_total", {"tier": tier})
            return int(v or 0)

        return TierStats(
            value("kvstore_tier_hits"),
            value("kvstore_tier_misses"),
            value("kvstore_tier_read_bytes"),
            value("kvstore_tier_written_bytes"),
            value("kvstore_tier_put_failures"),
            value("kvstore_tier_checksum_failures"),
            _evictions(backend),
            usage.items,
            usage.bytes_used,
            usage.bytes_capacity,
        )


class _OccupancyCollector:
    """Reads occupancy and eviction counts from the backends at scrape time."""

    def __init__(self, tiers: Callable[[], dict[str, Any]]) -> None:
        self._tiers = tiers

    def collect(self) -> Iterator[Any]:
        items = GaugeMetricFamily("kvstore_tier_items", "Chunks held by a tier", labels=["tier"])
        used = GaugeMetricFamily("kvstore_tier_used_bytes", "Bytes held by a tier", labels=["tier"])
        cap = GaugeMetricFamily(
            "kvstore_tier_capacity_bytes", "Capacity of a tier", labels=["tier"]
        )
        evicted = CounterMetricFamily(
            "kvstore_tier_evictions", "Chunks evicted from a tier", labels=["tier"]
        )
        for name, backend in self._tiers().items():
            usage = backend.usage()
            for family, v in (
                (items, usage.items),
                (used, usage.bytes_used),
                (cap, usage.bytes_capacity),
            ):
                if v is not None:
                    family.add_metric([name], v)
            evicted.add_metric([name], _evictions(backend))
        yield from (items, used, cap, evicted)


def _evictions(backend: Any) -> int:
    return backend.evictions if isinstance(backend, CountsEvictions) else 0
