"""What the benchmarks and the tests both need to drive real processes on loopback.

Child processes (a process group each, output to a pipe or a log file, stopped at exit),
free TCP ports, waiting with a deadline (for a line of output, an HTTP endpoint, any
condition), plain HTTP requests, Prometheus ``/metrics`` scraped and parsed, a private
``redis-server``, and percentiles.

Percentiles are linearly interpolated between the closest ranks (numpy's default
method), as the benchmarks have always reported them.

Standard library only at import time: ``benchmarks/vllm_runner.py`` loads it from the
vLLM virtual environment, which has none of this project's dependencies
(``prometheus_client`` is imported by the metrics parser when it runs). The tests import
it as ``benchmarks.harness``; the benchmark scripts, like their other neighbours, as
``harness`` from their own folder.
"""

from __future__ import annotations

import atexit
import http.client
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]

ENGINE_READY = re.compile(r"engine serve: http://(\S+):(\d+)")
"""``engine serve``'s ready line: host, port."""
DAEMON_READY = re.compile(r"grpc (\S+):(\d+) stream (\d+) metrics (\d+|-)")
"""``kvstore serve``'s ready line: host, gRPC port, stream port, metrics port (or -)."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Every sample of a /metrics page: {(sample name, sorted (label, value) pairs): value}."""


# -- ports ----------------------------------------------------------------------------------
def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on loopback now."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def free_port(bus_offset: int = 0) -> int:
    """A free loopback port; with ``bus_offset``, one whose ``port + bus_offset`` is free
    too (a Redis cluster node's bus port is its port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus_offset:
            return port
        if port + bus_offset < 65536 and port_is_free(port + bus_offset):
            return port
    raise RuntimeError(f"no free port with port + {bus_offset} free too")


# -- waiting --------------------------------------------------------------------------------
def poll_until(cond: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Calls ``cond`` every ``interval`` s until it returns something true (True) or
    ``timeout`` s have passed (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def wait_until(
    cond: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = 0.05,
) -> None:
    """``poll_until``, failing the test (AssertionError) at the deadline."""
    if not poll_until(cond, timeout, interval):
        raise AssertionError(f"timed out waiting for {what}")


# -- HTTP -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def json_or_text(self) -> Any:
        """The body as JSON, or as text when it is not JSON."""
        try:
            return self.json()
        except ValueError:
            return self.text


def http_request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str | None] | None = None,
    timeout: float = 60.0,
) -> Reply:
    """One request on a fresh connection, whatever the status. Nothing is tidied up: the
    body is sent as it is, a header given as None is left out, and ``Transfer-Encoding:
    chunked`` sends the body chunked."""
    parts = urllib.parse.urlsplit(url)
    sent = {k: v for k, v in (headers or {}).items() if v is not None}
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(
            method,
            path or "/",
            body,
            sent,
            encode_chunked=sent.get("Transfer-Encoding") == "chunked",
        )
        resp = conn.getresponse()
        return Reply(resp.status, dict(resp.headers), resp.read())
    finally:
        conn.close()


def http_answers(url: str, any_status: bool = False) -> bool:
    """Whether a GET of ``url`` answers 2xx now (any status, with ``any_status``)."""
    try:
        status = http_request(url, timeout=2).status
    except (OSError, http.client.HTTPException):
        return False
    return any_status or 200 <= status < 300


# -- child processes ------------------------------------------------------------------------
_running: set[Child] = set()


class Child(subprocess.Popen):
    """A child in a process group of its own (``stop`` ends the whole group), stdout and
    stderr together in a text pipe (``log=None``; reading it is the caller's business) or
    in the file ``log``. Any still running when this interpreter exits are killed."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path = ROOT,
    ) -> None:
        self.log_path = Path(log) if log is not None else None
        self._seen: list[str] = []
        self._eof = False
        out = open(self.log_path, "w") if self.log_path else subprocess.PIPE  # noqa: SIM115
        try:
            super().__init__(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
        finally:
            if self.log_path:
                out.close()  # the child has its own copy
        _running.add(self)

    def output(self) -> str:
        """The log so far (in pipe mode: the lines ``wait_for_line`` read)."""
        if self.log_path is None:
            return "".join(self._seen)
        return self.log_path.read_text(errors="replace")

    def wait_for_line(
        self, pattern: str | re.Pattern, timeout: float, what: str | None = None
    ) -> re.Match:
        """The match of ``pattern`` in the first line of output that has it; at the
        deadline, or once the child has exited without it, the child is killed and
        RuntimeError raised."""
        pattern = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.poll() is not None
            m = self._log_match(pattern) if self.log_path else self._next_pipe_match(pattern)
            if m:
                return m
            if exited and (self.log_path or self._eof):
                break
        self._give_up(what or "it", "print the line waited for")

    def wait_for_http(self, url: str, timeout: float, any_status: bool = False) -> None:
        """Until a GET of ``url`` answers (see ``http_answers``); RuntimeError (the child
        killed) if the child exits or the deadline passes first."""
        deadline = time.monotonic() + timeout
        while not http_answers(url, any_status):
            if self.poll() is not None or time.monotonic() > deadline:
                self._give_up(url, "answer")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM to the group; SIGKILL if it has not exited after ``timeout`` s. The
        exit status (-9 when it had to be killed)."""
        if self.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.wait(10)
        return self._reaped()

    def kill_group(self) -> int:
        """SIGKILL to the group at once (kill -9: no shutdown at all); the exit status."""
        if self.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.wait(10)
        return self._reaped()

    def _reaped(self) -> int:
        _running.discard(self)
        return self.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _next_pipe_match(self, pattern: re.Pattern) -> re.Match | None:
        readable, _, _ = select.select([self.stdout], [], [], 0.5)
        if not readable:
            return None
        line = self.stdout.readline()  # type: ignore[union-attr]
        self._eof = line == ""
        self._seen.append(line)
        return pattern.search(line)

    def _log_match(self, pattern: re.Pattern) -> re.Match | None:
        for line in self.output().splitlines():
            m = pattern.search(line)
            if m:
                return m
        time.sleep(0.2)
        return None

    def _give_up(self, what: str, action: str) -> NoReturn:
        self.kill_group()
        raise RuntimeError(
            f"{self.args[:4]}: {what} did not {action} (exit status "
            f"{self.returncode}): {self.output()[-3000:]}"
        )


@atexit.register
def _kill_leftovers() -> None:
    for child in list(_running):
        child.kill_group()


# -- Redis ----------------------------------------------------------------------------------
def redis_answers(port: int) -> bool:
    """Whether a Redis-protocol server on loopback ``port`` answers PING now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(binary: str, workdir: str | Path, *extra: str) -> tuple[Child, int]:
    """A redis-compatible server on a free loopback port, persistence off, its log in
    ``workdir``; once it answers PING."""
    port = free_port(bus_offset=10000 if "--cluster-enabled" in extra else 0)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *extra,
    ]
    child = Child(argv, log=Path(workdir) / f"redis-{port}.log")
    if not poll_until(lambda: redis_answers(port) or child.poll() is not None, 10, 0.02):
        child._give_up(binary, "answer PING")
    if child.poll() is not None:
        child._give_up(binary, "stay up")
    return child, port


# -- Prometheus /metrics --------------------------------------------------------------------
def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape_metrics(base_url: str, timeout: float = 10.0) -> Samples:
    """Every sample of ``base_url``'s ``/metrics``."""
    reply = http_request(base_url.rstrip("/") + "/metrics", timeout=timeout)
    if reply.status != 200:
        raise RuntimeError(f"{base_url}/metrics answered {reply.status}: {reply.text[:300]}")
    return parse_metrics(reply.text)


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` over the label sets that hold ``labels``."""
    return sum(
        value
        for (sample, have), value in samples.items()
        if sample == name and labels.items() <= dict(have).items()
    )


def totals_by_name(samples: Samples) -> dict[str, float]:
    """Sample name -> its values summed over every label set."""
    out: dict[str, float] = {}
    for (name, _), value in samples.items():
        out[name] = out.get(name, 0.0) + value
    return out


# -- percentiles ----------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float, empty: Any = math.nan) -> Any:
    """The ``q``-th percentile (q in [0, 100]), linearly interpolated between the closest
    ranks (numpy's default); ``empty`` when there are no values."""
    if not values:
        return empty
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
