"""Start ``engine serve`` as a real subprocess on a free port, for the server tests."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

from http_raw import post

from benchmarks.harness import (
    ENGINE_READY,
    Child,
    http_request,
    metric_sum,
    poll_until,
    scrape_metrics,
)


@dataclass
class EngineProc:
    proc: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kwargs: Any):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, **kwargs)

    def stop(self, timeout: float = 30) -> int:
        return self.proc.stop(timeout)

    def post(self, path: str, body: bytes | dict) -> tuple[int, Any]:
        """Raw POST (for bodies the openai client would refuse to send)."""
        return post(self.port, path, body)

    def get(self, path: str) -> tuple[int, str]:
        reply = http_request(self.url + path, timeout=30)
        return reply.status, reply.text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of series ``name`` over the label sets that hold ``labels``."""
        return metric_sum(scrape_metrics(self.url), name, **labels)

    def settled_metric(self, name: str, want: float, timeout: float = 5.0, **labels: str) -> float:
        """``metric(name)`` once it equals ``want`` (or its value at ``timeout``): gauges
        the engine loop publishes after a step may trail the answer that step sent."""
        poll_until(lambda: self.metric(name, **labels) == want, timeout, interval=0.02)
        return self.metric(name, **labels)


def start_engine(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> EngineProc:
    """``engine serve --port 0 ARGS`` once it prints its ready line."""
    proc = Child([sys.executable, "-m", "engine.cli", "serve", "--port", "0", *args], env=env)
    m = proc.wait_for_line(ENGINE_READY, timeout, "engine serve")
    _drain(proc)
    return EngineProc(proc, int(m.group(2)))


def _drain(proc: Child) -> None:
    """Keep reading the server's output so a full pipe never blocks it."""

    def pump() -> None:
        for _ in proc.stdout:  # type: ignore[union-attr]
            pass

    threading.Thread(target=pump, daemon=True).start()
