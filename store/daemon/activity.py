"""Request accounting shared by both transports: per-client metrics, in-flight count, drain.

On SIGTERM the daemon stops taking new requests (``UNAVAILABLE``), waits for those in
flight to finish (``drain``), then closes the store, so no write is cut in half.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_CLIENTS = 256
"""Distinct client labels kept; later ones count as ``other`` (bounded label cardinality)."""
_CLIENT = re.compile(r"[^A-Za-z0-9_.:@/-]")


class Draining(RuntimeError):
    """The daemon is shutting down and takes no new requests (UNAVAILABLE)."""


class Activity:
    """Counts requests by client, method and transport, and tracks those in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = time.monotonic()
        self.draining = False
        self.total = 0
        self._in_flight = 0
        self._cond = threading.Condition()
        self._clients: set[str] = set()
        r = registry
        self.requests = Counter(
            "kvstore_daemon_requests",
            "Requests served, by client, method and transport",
            ["client", "method", "transport"],
            registry=r,
        )
        self.errors = Counter(
            "kvstore_daemon_request_errors",
            "Requests refused or failed, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "kvstore_daemon_request_seconds",
            "Time to serve one request",
            ["method"],
            buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=r,
        )
        self.bytes = Counter(
            "kvstore_daemon_payload_bytes",
            "Payload bytes moved, by direction and transport",
            ["direction", "transport"],
            registry=r,
        )
        self.turned_away = Counter(
            "kvstore_daemon_stream_turned_away",
            "Stream connections closed before hello: over --max-connections (cap) or past "
            "--handshake-timeout (handshake)",
            ["reason"],
            registry=r,
        )
        for reason in ("cap", "handshake"):  # exported at 0 from the start
            self.turned_away.labels(reason)
        Gauge("kvstore_daemon_in_flight", "Requests being served", registry=r).set_function(
            lambda: self._in_flight
        )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def client_label(self, name: str | None) -> str:
        label = _CLIENT.sub("_", name or "unknown")[:64] or "unknown"
        with self._cond:
            if label not in self._clients:
                if len(self._clients) >= MAX_CLIENTS:
                    return "other"
                self._clients.add(label)
        return label

    @contextmanager
    def request(self, client: str, method: str, transport: str) -> Iterator[None]:
        """Count one request for its whole length; raises Draining once shutdown began."""
        with self._cond:
            if self.draining:
                raise Draining("the daemon is shutting down")
            self._in_flight += 1
            self.total += 1
        self.requests.labels(self.client_label(client), method, transport).inc()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.latency.labels(method).observe(time.perf_counter() - start)
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new requests, wait up to ``timeout`` s for those in flight; True if none left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.draining = True
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True
