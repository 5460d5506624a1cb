"""A kvstore daemon as a tier (``kvstore://host:port``): the node's shared cache.

Failure rule, as for redis: the daemon may be slow, restarting or gone, and the engine
must not notice beyond losing its hits. Every call has a deadline (``timeout``); an
error is logged and turns the batch into misses (or failed puts). After an error the
backend stays away for a back-off that doubles from ``retry_after`` up to
``max_retry_after`` seconds, so a dead daemon costs one timeout per back-off, not one
per request; the first call after it reconnects (stream port and region anew, since a
restarted daemon has new ones).

Bad input refused by the daemon (INVALID_ARGUMENT) is a bug on this side, not an
outage: logged as an error, the put fails, no back-off. So is a refusal of what this
tier's token may not do (PERMISSION_DENIED: a read-only token's put, a salt-bound
token's Stats): the call fails, logged once per kind of call, and reads go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from backends.base import Backend, GetResult, Usage
from kvcore.chunk import Chunk
from store.client import KVStoreClient, parse_url
from store.wire.stream import RemoteError

log = logging.getLogger(__name__)


def read_token(path: str | None) -> str | None:
    """The bearer token in file ``path`` (surrounding whitespace dropped), or None."""
    if not path:
        return None
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


class RemoteBackend(Backend):
    """Chunks held by the kvstore daemon at ``url``."""

    name = "remote"
    networked = True

    def __init__(
        self,
        url: str,
        token_file: str | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        retry_after: float = 1.0,
        max_retry_after: float = 30.0,
        transport: str = "auto",
        token: str | None = None,
    ) -> None:
        parse_url(url)  # a malformed url is a configuration error, raised now
        self.url = url
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        self.client = KVStoreClient(
            url,
            token or read_token(token_file),
            timeout=timeout,
            connect_timeout=connect_timeout,
            transport=transport,
        )
        self._backoff = retry_after
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self._denied: set[str] = set()  # calls the token may not make, logged once each

    # -- plumbing -------------------------------------------------------------------
    def available(self) -> bool:
        """False while backing off after an error (or once closed)."""
        return not self._closed and time.monotonic() >= self._down_until

    def _run(self, what: str, fn: Callable[[], Any], fallback: Any) -> Any:
        if not self.available():
            return fallback
        try:
            result = fn()
        except RemoteError as exc:
            if exc.code == "INVALID_ARGUMENT":
                log.error("remote tier %s refused %s: %s", self.url, what, exc.message)
                return fallback
            if exc.code == "PERMISSION_DENIED":
                level = logging.DEBUG if what in self._denied else logging.WARNING
                self._denied.add(what)
                log.log(level, "remote tier %s: %s not allowed: %s", self.url, what, exc.message)
                return fallback
            self._failed(what, exc)
            return fallback
        except (OSError, ConnectionError, ValueError) as exc:
            self._failed(what, exc)
            return fallback
        with self._lock:
            self._backoff = self.retry_after
        return result

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            wait = self._backoff
            self._backoff = min(self._backoff * 2, self.max_retry_after)
            self._down_until = time.monotonic() + wait
        log.warning(
            "remote tier %s: %s failed (%s); treating as misses for %.1fs",
            self.url,
            what,
            exc,
            wait,
        )

    # -- the interface --------------------------------------------------------------
    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        if not chunks:
            return []
        return self._run("put", lambda: self.client.put(chunks), [False] * len(chunks))

    def get(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> list[GetResult]:
        if not keys:
            return []
        return self._run("get", lambda: self.client.get(keys, outs), [None] * len(keys))

    def contains(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return self._run("lookup", lambda: len(self.client.lookup(keys)), 0)

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return self._run("delete", lambda: self.client.delete(keys), 0)

    # -- leases (a prefill node's hand-off to a decode node; store/daemon/lease.py) -----
    def lease(
        self, keys: Sequence[str], ttl: float, timeout: float | None = None
    ) -> tuple[str, int, float]:
        """Pin the leading stored ``keys`` in the daemon for ``ttl`` seconds:
        ``(lease_id, count, expires_at)`` (unix time); ``("", 0, 0.0)`` when none is
        stored, the daemon refuses (over a lease cap) or cannot be reached."""
        from store.wire.proto import kvstore_pb2 as pb

        def call() -> tuple[str, int, float]:
            try:
                r = self.client._call(
                    "Lease", pb.LeaseRequest(keys=list(keys), ttl_seconds=ttl), timeout
                )
            except RemoteError as exc:
                if exc.code != "RESOURCE_EXHAUSTED":
                    raise
                # A cap on leases (store/daemon/lease.py), not an outage: no back-off.
                log.warning("remote tier %s refused a lease: %s", self.url, exc.message)
                return "", 0, 0.0
            return r.lease_id, r.count, r.expires_at

        return self._run("lease", call, ("", 0, 0.0)) if keys else ("", 0, 0.0)

    def release(self, lease_id: str, timeout: float | None = None) -> bool:
        """End a lease early (its keys are unpinned); False if unknown or unreachable."""
        from store.wire.proto import kvstore_pb2 as pb

        if not lease_id:
            return False
        return self._run(
            "release",
            lambda: (
                self.client._call("Release", pb.ReleaseRequest(lease_id=lease_id), timeout).released
            ),
            False,
        )

    def active_leases(self) -> int | None:
        """How many leases the daemon holds (None when unreachable)."""
        from store.wire.proto import kvstore_pb2 as pb

        return self._run(
            "release", lambda: self.client._call("Release", pb.ReleaseRequest()).active, None
        )

    def usage(self) -> Usage:
        """The daemon's occupancy summed over its tiers (None when unreachable)."""

        def total() -> Usage:
            tiers = self.client.stats().tiers
            known = [t for t in tiers if t.items >= 0]
            return Usage(
                sum(t.items for t in known) if known else None,
                sum(t.bytes_used for t in known) if known else None,
                sum(t.bytes_capacity for t in known) if known else None,
            )

        return self._run("stats", total, Usage(None, None, None))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()
