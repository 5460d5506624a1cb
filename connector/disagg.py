"""Disaggregated prefill/decode over a kvstore daemon: ``kv_transfer_params``.

The request and response fields follow vLLM's disaggregated serving (its toy proxy and
``NixlConnector.request_finished``) so that operators recognise them:

* prefill leg (to a ``producer``): ``{"do_remote_decode": true}``, ``max_tokens`` 1.
  Optional: ``remote_store`` (``kvstore://host:port``, the daemon the decode node
  reads; default: the producer's own ``--kvstore``) and ``lease_ttl`` (seconds).
* its answer: ``{"do_remote_prefill": true, "do_remote_decode": false, "remote_store",
  "keys", "num_tokens", "lease_id", "lease_expires", "remote_engine_id",
  "remote_block_ids", "remote_host", "remote_port", "tp_size"}``.
* decode leg (to a ``consumer``): that answer as its ``kv_transfer_params``.

The producer's KV goes into the store by the connector's ordinary saves (whole prompt
chunks, keys from the one key module). When the request finishes, :meth:`TransferAgent.finish`
(off the engine loop) waits for that request's puts under a deadline, copies the chunks
to ``remote_store`` if that is not one of its own tiers, and leases them in the daemon
(``Lease``: pinned against eviction until released or expired). The count the daemon
reports as stored and pinned is what ``num_tokens`` promises: durability is checked
where the decode node reads, not assumed.

The consumer needs no special path: its admission-time lookup finds the chunks (same
keys), loads them, and recomputes whatever is missing, late or broken. When its request
finishes (or is aborted) the lease is released in the background; an unreleased lease
ends at ``lease_expires`` in the daemon.

These fields come from HTTP requests nobody authenticated, so ``HandOffPolicy`` bounds
what they may ask (store config keys, docs/server.md "Limits"): a ``remote_store`` must
be on the allow-list (the engine's own kvstore tier, plus ``allowed_remote_stores``) or
the request is refused before anything runs or connects; ``lease_ttl`` is at most
``max_lease_ttl``; and past ``max_outstanding_leases`` unexpired leases the engine
answers without a hand-off. The daemon caps what leases pin as well (its LeaseTable).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends.remote import RemoteBackend
from connector.handoff_policy import HandOffPolicy, LeaseLedger
from store.client import parse_url
from store.config import MAX_LEASE_TTL

if TYPE_CHECKING:
    from store.tiered import TieredStore

log = logging.getLogger(__name__)


def wants_remote_decode(params: Any) -> bool:
    """A prefill leg: save the prompt's KV for a decode node, answer with its handle."""
    return isinstance(params, dict) and bool(params.get("do_remote_decode"))


def wants_remote_prefill(params: Any) -> bool:
    """A decode leg: the prompt's KV was computed elsewhere and is in the store."""
    return isinstance(params, dict) and bool(params.get("do_remote_prefill"))


def check_params(params: Any, policy: HandOffPolicy | None = None) -> str | None:
    """Why ``params`` is not a usable ``kv_transfer_params`` object (None: it is). With
    an engine's ``policy``, also why it asks more than that engine allows (a store off
    its allow-list, a lease longer than its ``max_lease_ttl``)."""
    if not isinstance(params, dict):
        return "'kv_transfer_params' must be an object"
    store = params.get("remote_store")
    if store is not None:
        if not isinstance(store, str):
            return "'kv_transfer_params.remote_store' must be a kvstore:// url"
        try:
            parse_url(store)
        except ValueError as e:
            return f"'kv_transfer_params.remote_store': {e}"
        if policy is not None and policy.store_url(store) is None:
            return (
                f"'kv_transfer_params.remote_store' {store[:100]!r} is not a store this "
                "engine may call (its own kvstore tier, or one in allowed_remote_stores)"
            )
    ttl = params.get("lease_ttl")
    top, which = (MAX_LEASE_TTL, "") if policy is None else (policy.max_ttl, " (max_lease_ttl)")
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= top
    ):
        return f"'kv_transfer_params.lease_ttl' must be a number of seconds in (0, {top:g}]{which}"
    lease = params.get("lease_id")
    if lease is not None and not isinstance(lease, str):
        return "'kv_transfer_params.lease_id' must be a string"
    return None


@dataclass(slots=True)
class RemoteDecode:
    """A finished prefill leg whose KV is still to be made durable and leased."""

    request_id: str
    keys: list[str]  # the prompt's whole chunks, in order
    store_url: str | None
    ttl: float
    timeout: float
    futures: list[Future] = field(default_factory=list)  # this request's puts


class TransferAgent:
    """The store side of ``kv_transfer_params`` for one connector."""

    def __init__(self, store: TieredStore, chunk_size: int) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self._own = {
            t.backend.url: t.backend for t in store.tiers if isinstance(t.backend, RemoteBackend)
        }
        self.policy = HandOffPolicy.of(store.config, list(self._own))
        self.leases = LeaseLedger(self.policy.max_leases)  # this engine's unexpired leases
        self._others: dict[str, RemoteBackend] = {}  # allowed stores only: bounded
        self._others_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def default_url(self) -> str | None:
        return next(iter(self._own), None)

    def backend(self, url: str, timeout: float = 5.0) -> RemoteBackend:
        """The backend of an allowed store ``url`` (``HandOffPolicy.store_url``)."""
        b = self._own.get(url) or self._others.get(url)
        if b is None:
            with self._others_lock:  # hand-offs finish on several threads at once
                b = self._others.get(url)
                if b is None:
                    b = self._others[url] = RemoteBackend(url, timeout=timeout, retry_after=0.5)
        return b

    def finish(self, handle: RemoteDecode) -> dict[str, Any]:
        """Blocking (call it off the engine loop): wait for the request's puts, put the
        chunks into ``store_url`` if it is another daemon, lease them; the response's
        ``kv_transfer_params``. Every step is bounded by ``handle.timeout`` in all."""
        deadline = time.monotonic() + handle.timeout
        url = self.policy.store_url(handle.store_url) if handle.store_url else self.default_url
        out: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_store": url,
            "keys": [],
            "num_tokens": 0,
            "lease_id": None,
            "lease_expires": None,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
            "tp_size": 1,
        }
        if url is None or not handle.keys:  # (a store off the allow-list never gets here)
            return out
        if not self.leases.reserve():
            log.warning(
                "request %s: %d leases outstanding (max_outstanding_leases); no KV hand-off",
                handle.request_id,
                self.policy.max_leases,
            )
            return out
        try:
            return self._hand_off(handle, url, out, deadline)
        finally:
            self.leases.settle(out["lease_id"], out["lease_expires"])

    def _hand_off(
        self, handle: RemoteDecode, url: str, out: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        addr = parse_url(url)
        out["remote_host"], out["remote_port"] = addr.host, addr.port
        _, late = wait(handle.futures, timeout=max(0.0, deadline - time.monotonic()))
        if late:
            log.warning(
                "request %s: %d KV save(s) not done by the deadline; leasing what is stored",
                handle.request_id,
                len(late),
            )
        try:
            backend = self.backend(url)
            if url not in self._own:  # the decode node reads another daemon: copy there
                chunks = self.store.get(handle.keys)
                n = next((i for i, c in enumerate(chunks) if c is None), len(chunks))
                if n:
                    backend.put(chunks[:n])
            left = max(1.0, deadline - time.monotonic())  # the lease itself: one RPC
            ttl = min(handle.ttl, self.policy.max_ttl)
            lease_id, count, expires = backend.lease(handle.keys, ttl, timeout=left)
        except Exception as e:  # noqa: BLE001 - no KV handed over: the decode node recomputes
            log.warning("request %s: KV hand-off to %s failed: %s", handle.request_id, url, e)
            return out
        if count:
            out.update(
                keys=handle.keys[:count],
                num_tokens=count * self.chunk_size,
                lease_id=lease_id,
                lease_expires=expires,
            )
        return out

    def release_async(self, url: str | None, lease_id: str) -> Future | None:
        """Release a lease in the background (the engine loop never waits on it); only
        in an allowed store."""
        url = self.policy.store_url(url) if url else self.default_url
        if url is None or not lease_id:
            return None
        self.leases.forget(lease_id)  # one of ours (kv_role both), if it was
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-lease")
        return self._pool.submit(self._release, url, lease_id)

    def _release(self, url: str, lease_id: str) -> bool:
        try:
            return self.backend(url).release(lease_id)
        except Exception as e:  # noqa: BLE001 - the lease then ends at its expiry
            log.warning("releasing lease %s at %s failed: %s", lease_id, url, e)
            return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for b in self._others.values():
            b.close()
        self._others.clear()
