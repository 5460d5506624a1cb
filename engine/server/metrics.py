"""The server's Prometheus series, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from engine.async_engine import EngineStats
from engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Requests, tokens, latencies, the scheduler's queues and the KV block pool."""

    def __init__(self, model: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = {"model": model}
        self.requests = Counter(
            "engine_requests",
            "Requests finished, by endpoint and finish reason",
            ["endpoint", "finish_reason"],
            registry=r,
        )
        self.errors = Counter(
            "engine_request_errors",
            "Requests refused or failed, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("engine_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("engine_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter(
            "engine_cached_tokens",
            "Reused prompt tokens, by source (engine cache or store tier)",
            ["source"],
            registry=r,
        )
        self.ttft = Histogram(
            "engine_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "engine_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("engine_requests_running", "Requests running", registry=r)
        self.waiting = Gauge("engine_requests_waiting", "Requests waiting", registry=r)
        self.blocks_total = Gauge("engine_kv_blocks_total", "KV cache blocks", registry=r)
        self.blocks_free = Gauge(
            "engine_kv_blocks_free", "KV blocks no request holds (cached or empty)", registry=r
        )
        self.kv_usage = Gauge("engine_kv_cache_usage_ratio", "Blocks held / blocks", registry=r)
        info = Gauge("engine_model_info", "The served model", ["model"], registry=r)
        info.labels(**labels).set(1)

    def observe(self, endpoint: str, out: RequestOutput) -> None:
        """Count one finished (or aborted) request."""
        m = out.metrics
        self.requests.labels(endpoint, out.finish_reason or "abort").inc()
        self.prompt_tokens.inc(m.num_prompt_tokens)
        self.generation_tokens.inc(len(out.token_ids))
        for source, n in m.kv_sources.items():
            if n > 0:
                self.cached_tokens.labels(source).inc(n)
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)

    def render(self, stats: EngineStats) -> bytes:
        """The exposition text, with the gauges set from the engine's latest snapshot."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.blocks_total.set(stats.num_blocks)
        self.blocks_free.set(stats.free_blocks)
        used = stats.num_blocks - stats.free_blocks
        self.kv_usage.set(used / stats.num_blocks if stats.num_blocks else 0.0)
        return generate_latest(self.registry)
