"""Redis / Valkey tier, standalone or cluster: one key per chunk, pipelined batches.

URLs: ``redis://`` and ``rediss://`` (TLS) for one server, ``valkey://`` / ``valkeys://``
as aliases (Valkey speaks the Redis protocol), and ``redis+cluster://`` (also
``rediss+cluster://``, ``valkey+cluster://``) naming any node of a cluster.

Failure rule: the remote tier may be slow or gone; the engine must not notice beyond
losing its hits. Every call has connect and socket timeouts; an error is logged and
turns the batch into misses (or failed puts). After an error the backend stays away for
``retry_after`` seconds, so a dead server costs one timeout, not one per request.

Gets on one server skip redis-py's reply parser: ``backends.resp.ChunkReplyReader``
reads each payload straight into the caller's buffer and checks its xxh3 there (one
copy instead of four). Cluster gets use redis-py pipelines and ``decode``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from backends.base import Backend, Corrupt, GetResult, Usage
from backends.resp import ChunkReplyReader, connection_class_for, pack_gets, zero_copy_value
from kvcore.buffers import as_tensor, flat_bytes, host_array
from kvcore.chunk import Chunk, ChunkError, HeaderCache, decode, on_device

log = logging.getLogger(__name__)
_ERRORS = (redis.RedisError, RedisClusterException, OSError)
_SCHEMES = {
    "redis": ("redis", False),
    "rediss": ("rediss", False),
    "valkey": ("redis", False),
    "valkeys": ("rediss", False),
    "redis+cluster": ("redis", True),
    "rediss+cluster": ("rediss", True),
    "valkey+cluster": ("redis", True),
    "valkeys+cluster": ("rediss", True),
}


def parse_url(url: str) -> tuple[str, bool]:
    """The redis-py URL for ``url`` and whether it names a cluster."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError(f"redis url {url!r}: scheme must be one of {', '.join(_SCHEMES)}")
    base, cluster = _SCHEMES[scheme]
    return f"{base}://{rest}", cluster


class RedisBackend(Backend):
    """Chunks as ``<namespace><key>`` string values on a Redis/Valkey server or cluster."""

    name = "redis"
    networked = True

    def __init__(
        self,
        url: str,
        namespace: str = "kvstore:",
        ttl: float | None = None,
        connect_timeout: float = 1.0,
        timeout: float = 5.0,
        retry_after: float = 5.0,
        batch_size: int = 64,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.ttl_ms = int(ttl * 1000) if ttl else None
        self.retry_after = retry_after
        self.batch_size = batch_size
        self._down_until = 0.0
        self._closed = False
        self._lock = threading.Lock()
        self._headers = HeaderCache()
        raw_url, self.cluster = parse_url(url)
        options: dict[str, Any] = dict(
            socket_connect_timeout=connect_timeout,
            socket_timeout=timeout,
            connection_class=connection_class_for(raw_url),
            retry=Retry(NoBackoff(), 0),  # we back off ourselves (retry_after), per backend
        )
        if self.cluster:
            # Lazy: a cluster client contacts a node to learn the slot map, and a
            # backend must be constructible while the cluster is down.
            self._raw_url, self._options = raw_url, options
            self._client: Any = None
        else:
            self._client = redis.Redis.from_url(raw_url, **options)

    # -- plumbing -------------------------------------------------------------------
    def available(self) -> bool:
        """False while backing off after an error (or once closed)."""
        return not self._closed and time.monotonic() >= self._down_until

    def _connected(self) -> Any | None:
        """The client, or ``None`` while backing off after an error."""
        if self._closed or time.monotonic() < self._down_until:
            return None
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = RedisCluster.from_url(self._raw_url, **self._options)
                    except _ERRORS as exc:
                        self._failed("connect", exc)
                        return None
        return self._client

    def _failed(self, what: str, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "%s tier %s: %s failed (%s); treating as misses for %.0fs",
                self.name,
                self.url,
                what,
                exc,
                self.retry_after,
            )
        self._down_until = time.monotonic() + self.retry_after

    def _run(self, what: str, build: Any, items: Sequence[Any]) -> list[Any]:
        """Run ``build(pipe, item)`` for each item in pipelined batches of ``batch_size``.

        One reply per item; ``None`` for items of a batch that failed or never ran (the
        batches before a failure keep their replies: those writes did happen).
        """
        out: list[Any] = []
        client = self._connected()
        if client is not None:
            try:
                for i in range(0, len(items), self.batch_size):
                    pipe = client.pipeline(transaction=False)
                    for item in items[i : i + self.batch_size]:
                        build(pipe, item)
                    out.extend(pipe.execute(raise_on_error=True))
            except _ERRORS as exc:
                self._failed(what, exc)
        return out + [None] * (len(items) - len(out))

    # -- the interface --------------------------------------------------------------
    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        def build(pipe: Any, chunk: Chunk) -> None:
            pipe.set(self.namespace + chunk.header.key, zero_copy_value(chunk), px=self.ttl_ms)

        return [bool(r) for r in self._run("put", build, chunks)]

    def get(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> list[GetResult]:
        outs = outs if outs is not None else [None] * len(keys)
        if self.cluster:
            values = self._run("get", lambda pipe, k: pipe.get(self.namespace + k), keys)
            results = [self._decode(k, v, o) for k, v, o in zip(keys, values, outs, strict=True)]
        else:
            results = self._get_in_place(keys, outs)
        bad = [r.key for r in results if isinstance(r, Corrupt)]
        if bad:
            self.delete(bad)
        return results

    def _get_in_place(self, keys: Sequence[str], outs: Sequence[Any]) -> list[GetResult]:
        """Pipelined GETs whose payloads land in ``outs`` (``ChunkReplyReader``), checked.

        One pooled connection for the whole call; batches of ``batch_size`` per round
        trip, like ``_run``. An error turns the rest of the call into misses and drops
        the connection (its reply stream is out of step)."""
        out: list[GetResult] = []
        client = self._connected()
        if client is None:
            return [None] * len(keys)
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            reader = ChunkReplyReader(conn.raw_socket(), self._headers)
            prefix = self.namespace.encode()
            for i in range(0, len(keys), self.batch_size):
                batch = keys[i : i + self.batch_size]
                conn.send_packed_command([pack_gets([prefix + k.encode() for k in batch])])
                for key, dst in zip(batch, outs[i : i + self.batch_size], strict=True):
                    out.append(self._land(key, dst, reader))
        except _ERRORS as exc:
            conn.disconnect()
            self._failed("get", exc)
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return out + [None] * (len(keys) - len(out))

    def _land(self, key: str, out: Any, reader: ChunkReplyReader) -> GetResult:
        """The next reply, for ``key``, into ``out`` (staged through the host for a device)."""
        dst = flat_bytes(out) if out is not None else None
        host = host_array(dst) if dst is not None and not on_device(dst) else None
        got = reader.read_chunk(key, host)
        if isinstance(got, ChunkError):
            log.warning("%s tier: dropping unreadable object %s: %s", self.name, key[:12], got)
            return Corrupt(key, str(got))
        if got is None or dst is None or host is not None:
            return got
        staged = dst[: got.header.nbytes]  # a device buffer: copy the checked bytes over
        staged.copy_(as_tensor(got.payload))
        return Chunk(got.header, staged)

    def _decode(self, key: str, value: bytes | None, out: Any) -> GetResult:
        if value is None:
            return None
        try:
            chunk = decode(value)
        except ChunkError as exc:
            log.warning("%s tier: dropping unreadable object %s: %s", self.name, key[:12], exc)
            return Corrupt(key, str(exc))
        if out is None:
            return chunk
        dst = flat_bytes(out)[: chunk.header.nbytes]
        if isinstance(dst, np.ndarray):
            np.copyto(dst, host_array(chunk.payload))
        else:
            dst.copy_(as_tensor(chunk.payload))
        return Chunk(chunk.header, dst)

    def contains(self, keys: Sequence[str]) -> int:
        found = self._run("contains", lambda pipe, k: pipe.exists(self.namespace + k), keys)
        for i, n in enumerate(found):
            if not n:
                return i
        return len(keys)

    def delete(self, keys: Sequence[str]) -> int:
        res = self._run("delete", lambda pipe, k: pipe.delete(self.namespace + k), keys)
        return sum(r or 0 for r in res)

    def usage(self) -> Usage:
        return Usage(None, None, None)  # a shared server: our share is not knowable cheaply

    def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            client.close()
