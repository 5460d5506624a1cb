"""Prometheus metrics of the router, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

HIT_TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvrouter_backend_requests", "Requests sent to a backend", ["backend"], registry=r
        )
        self.errors = Counter(
            "kvrouter_backend_errors", "Failed requests to a backend", ["backend"], registry=r
        )
        self.latency = Histogram(
            "kvrouter_backend_latency_seconds",
            "Backend request latency (to the last byte)",
            ["backend"],
            registry=r,
        )
        self.healthy = Gauge(
            "kvrouter_backend_healthy",
            "1 if the backend passes health checks",
            ["backend"],
            registry=r,
        )
        self.in_flight = Gauge(
            "kvrouter_backend_in_flight", "Requests in flight", ["backend"], registry=r
        )
        self.decisions = Counter(
            "kvrouter_decisions", "Routing decisions", ["policy", "backend"], registry=r
        )
        self.predicted_hits = Histogram(
            "kvrouter_predicted_hit_tokens",
            "Cached prefix tokens predicted per decision",
            ["policy"],
            buckets=HIT_TOKEN_BUCKETS,
            registry=r,
        )
        self.kv_events = Counter(
            "kvrouter_kv_events", "KV events applied", ["instance"], registry=r
        )
        self.kv_gaps = Counter(
            "kvrouter_kv_event_gaps", "Sequence gaps in KV event streams", ["instance"], registry=r
        )
        self.pd_fallbacks = Counter(
            "kvrouter_pd_fallbacks", "P/D requests the decode node did whole", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
