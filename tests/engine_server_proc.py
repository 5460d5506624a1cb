"""Start ``engine serve`` as a real subprocess on a free port, for the server tests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from procs import spawn_until_ready

READY = re.compile(r"engine serve: http://(\S+):(\d+)")


@dataclass
class EngineProc:
    proc: subprocess.Popen
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        """Raw POST (for bodies the openai client would refuse to send)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of series ``name`` over the label sets that hold ``labels``."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def settled_metric(self, name: str, want: float, timeout: float = 5.0, **labels: str) -> float:
        """``metric(name)`` once it equals ``want`` (or its value at ``timeout``): gauges
        the engine loop publishes after a step may trail the answer that step sent."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(name, **labels)) != want and time.monotonic() < deadline:
            time.sleep(0.02)
        return value


def start_engine(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> EngineProc:
    """``engine serve --port 0 ARGS`` once it prints its ready line."""
    argv = [sys.executable, "-m", "engine.cli", "serve", "--port", "0", *args]
    proc, m = spawn_until_ready(argv, READY, "engine serve", timeout, env)
    _drain(proc)
    return EngineProc(proc, int(m.group(2)))


def _drain(proc: subprocess.Popen) -> None:
    """Keep reading the server's output so a full pipe never blocks it."""
    import threading

    def pump() -> None:
        for _ in proc.stdout:  # type: ignore[union-attr]
            pass

    threading.Thread(target=pump, daemon=True).start()
