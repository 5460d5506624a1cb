"""``kvstore serve``: host one TieredStore behind the gRPC API, the stream port and /metrics.

Start-up order: store, stream port, gRPC, metrics; then one line on stdout,
``kvstore serve: grpc HOST:PORT stream PORT metrics PORT``, for supervisors and tests.
SIGTERM (or SIGINT) drains: new requests get UNAVAILABLE, those in flight finish (up to
``drain_timeout`` seconds), then the ports close and the store closes its tiers (the
disk tier's files stay for the next start). Exit status 0.
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
from dataclasses import dataclass

from prometheus_client import start_http_server

from kvcore.heap import freeze_startup_heap
from store.config import StoreConfig
from store.daemon.activity import Activity
from store.daemon.auth import Authenticator, TokenEntry, is_loopback
from store.daemon.grpc_api import KVStoreServicer, start_grpc
from store.daemon.service import Limits, StoreService
from store.daemon.stream_server import StreamServer
from store.tiered import TieredStore
from store.wire.constants import DEFAULT_PORT, HELLO_TIMEOUT, MAX_CONNECTIONS
from store.wire.same_host import SameHost

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Where and how the daemon listens. Port 0 picks a free port (tests)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    stream_port: int = 0  # 0: any free port; clients learn it from Health
    metrics_port: int | None = 9400  # None: no /metrics
    token: str | None = None  # a read-write token (--auth-token-file)
    limits: Limits = Limits()
    drain_timeout: float = 30.0
    ucx: bool = False  # stream connections may move onto UCX (store/wire/ucx_transport.py)
    tokens: tuple[TokenEntry, ...] = ()  # scoped / salt-bound tokens (--auth-tokens, auth.py)
    insecure: bool = False  # may listen beyond loopback without any token
    metrics_host: str | None = None  # None: ``host``
    max_connections: int = MAX_CONNECTIONS  # open stream connections; one more is turned away
    handshake_timeout: float = HELLO_TIMEOUT  # seconds a stream connection may take to say hello

    def __post_init__(self) -> None:
        for name, value in (("port", self.port), ("stream_port", self.stream_port)):
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be 0-65535, got {value}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0-65535, got {self.metrics_port}")
        if isinstance(self.max_connections, bool) or not (
            isinstance(self.max_connections, int) and self.max_connections >= 1
        ):
            raise ValueError(
                f"max_connections must be a positive integer, got {self.max_connections!r}"
            )
        timeout = self.handshake_timeout
        if isinstance(timeout, bool) or not (
            isinstance(timeout, (int, float)) and 0 < timeout <= 3600  # nan fails too
        ):
            raise ValueError(
                f"handshake_timeout must be seconds in (0, 3600], got {self.handshake_timeout!r}"
            )
        if self.token is not None and not self.token.strip():
            raise ValueError("the auth token is empty")
        if not (self.token or self.tokens or self.insecure or is_loopback(self.host)):
            raise ValueError(
                f"--host {self.host} lets other machines in, and no token is set: anyone "
                "reaching the port could read and poison the cache; set --auth-token-file "
                "or --auth-tokens, or pass --insecure"
            )
        self.authenticator()  # a token listed twice is a configuration error, now

    def authenticator(self) -> Authenticator:
        """The tokens this daemon accepts: ``token`` (read-write, unbound) and ``tokens``."""
        extra = (TokenEntry(self.token),) if self.token else ()
        return Authenticator(extra + tuple(self.tokens))


class Daemon:
    """A running daemon; ``stop`` drains and closes it."""

    def __init__(self, config: StoreConfig, options: ServeOptions) -> None:
        self.options = options
        self.store = TieredStore(config)
        self.activity = Activity(self.store.metrics.registry)
        self.service = StoreService(self.store, options.limits)
        self.same_host = _open_door(self.store)
        auth = options.authenticator()
        _raise_fd_limit(options.max_connections)
        self.streams = StreamServer(
            self.service,
            self.activity,
            auth,
            ucx=options.ucx,
            same_host=self.same_host,
            max_connections=options.max_connections,
            handshake_timeout=options.handshake_timeout,
        )
        self.stream_port = self.streams.start(options.host, options.stream_port)
        # Any message a put may carry reaches the checks (INVALID_ARGUMENT with a reason);
        # only one larger than a whole request is cut off by gRPC (RESOURCE_EXHAUSTED).
        limits = options.limits
        max_message = max(limits.max_chunk_bytes, limits.max_request_bytes) + (1 << 20)
        servicer = KVStoreServicer(self.service, self.activity, self.stream_port, auth)
        servicer.stream_serving = self.streams.serving  # Health says when the port is dead
        self.grpc, self.port = start_grpc(
            servicer, f"{options.host}:{options.port}", auth, max_message
        )
        self.metrics_port = None
        self._http = None
        if options.metrics_port is not None:
            self._http, _ = start_http_server(
                options.metrics_port,
                options.metrics_host or options.host,
                registry=self.store.metrics.registry,
            )
            self.metrics_port = self._http.server_port
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Drain in-flight requests, then close ports and store. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if not self.activity.drain(self.options.drain_timeout):
            log.warning("drain timed out with %d requests in flight", self.activity.in_flight)
        self.grpc.stop(grace=1.0).wait()
        self.streams.stop()
        if self.same_host is not None:
            self.same_host.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.store.close()


def _raise_fd_limit(max_connections: int) -> None:
    """Raise the soft limit on open files towards the hard one, to fit ``max_connections``
    stream connections and the rest (as Redis does for maxclients); warn if it cannot.
    Short of descriptors the stream port still lives (it waits: stream_gate.py)."""
    want = max_connections + 256  # gRPC connections, tier files, the door, ...
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "open files are limited to %d (ulimit -n), fewer than --max-connections "
            "%d needs (%d): connections past it wait",
            soft,
            max_connections,
            want,
        )


def _open_door(store: TieredStore) -> SameHost | None:
    """The door for same-host clients (same_host.py), handing out the first tier's pool
    where it is shared."""
    try:
        return SameHost(store.shared_pool())
    except OSError as exc:
        log.warning("no door for same-host clients (%s): their gets and puts copy twice", exc)
        return None


def run(config: StoreConfig, options: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT, then drain and return 0."""
    daemon = Daemon(config, options)
    freeze_startup_heap()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"kvstore serve: grpc {options.host}:{daemon.port} stream {daemon.stream_port} "
        f"metrics {daemon.metrics_port or '-'} tiers {','.join(config.tiers)}"
        + (" ucx" if options.ucx else ""),
        flush=True,
    )
    while not stop.wait(3600):
        pass
    log.warning("signal received: draining %d requests in flight", daemon.activity.in_flight)
    daemon.stop()
    print("kvstore serve: stopped", flush=True)
    return 0
