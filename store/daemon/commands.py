"""``kvstore serve`` and ``kvstore stats``: from parsed arguments to a daemon or a table."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from store.config import ConfigError, StoreConfig, all_keys, env_var, from_flat, parse_size
from store.wire.constants import (
    DEFAULT_PORT,
    DEFAULT_URL,
    HELLO_TIMEOUT,
    MAX_BATCH,
    MAX_CHUNK_BYTES,
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML store config (tiers, cpu.size, disk.path, ...)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0: all; beyond loopback needs a token or --insecure)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: any free port)")
    p.add_argument("--stream-port", type=int, default=0, help="bulk-data port (0: any free port)")
    p.add_argument(
        "--ucx",
        action="store_true",
        help="also move bulk data over UCX for clients that ask (transport ucx; needs ucxx)",
    )
    p.add_argument(
        "--metrics-port", default="9400", help="Prometheus /metrics port; 'off' for none"
    )
    p.add_argument(
        "--metrics-host", help="address /metrics listens on (default: --host; it has no token)"
    )
    p.add_argument("--cpu-size", help="CPU tier size, e.g. 8GiB")
    p.add_argument("--disk-path", help="disk tier directory (adds the disk tier)")
    p.add_argument("--disk-size", help="disk tier byte budget, e.g. 100GiB")
    p.add_argument("--redis-url", help="Redis/Valkey behind the disk (adds the redis tier)")
    p.add_argument(
        "--auth-token-file", help="file holding a read-write bearer token clients may send"
    )
    p.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="YAML list of tokens with scope (read/write) and cache_salt (docs/daemon.md)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback with no token (anyone reaching it may write)",
    )
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="keys or chunks per request")
    p.add_argument(
        "--max-chunk-size",
        default=f"{MAX_CHUNK_BYTES >> 20}MiB",
        help="largest chunk payload accepted",
    )
    p.add_argument(
        "--max-request-size",
        default=f"{MAX_REQUEST_BYTES >> 20}MiB",
        help="largest put request (payload)",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="open stream connections at most",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=HELLO_TIMEOUT,
        help="seconds a stream connection may take to send hello",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a store config key",
    )


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help="the daemon, kvstore://host:port")
    p.add_argument("--auth-token-file", help="file holding the daemon's bearer token")


def daemon_config(args: argparse.Namespace, overrides: dict[str, str]) -> StoreConfig:
    """Store config of ``kvstore serve``: defaults < --config < KVSTORE_* < flags < --set.

    ``--disk-path`` and ``--redis-url`` add their tier when the tier list lacks it."""
    from store.config_load import flatten, read_yaml

    values: dict[str, Any] = flatten(read_yaml(args.config)) if args.config else {}
    values.update({k: os.environ[env_var(k)] for k in all_keys() if env_var(k) in os.environ})
    tiers = values.get("tiers", ["cpu"])
    tiers = [t.strip() for t in tiers.split(",")] if isinstance(tiers, str) else list(tiers)
    flags = {
        "cpu.size": args.cpu_size,
        "disk.path": args.disk_path,
        "disk.size": args.disk_size,
        "redis.url": args.redis_url,
    }
    for key, value in flags.items():
        if value is not None:
            values[key] = value
    for tier, flag in (("disk", args.disk_path), ("redis", args.redis_url)):
        if flag is not None and tier not in tiers:
            tiers.append(tier)
    values["tiers"] = tiers
    values.update(overrides)
    if tiers and tiers[0] == "cpu":  # same-host clients map the first tier's pool
        values.setdefault("cpu.shared", True)
    return from_flat(values)


def serve_options(args: argparse.Namespace) -> Any:
    from backends.remote import read_token
    from store.daemon.serve import ServeOptions
    from store.daemon.service import Limits

    metrics = None if str(args.metrics_port).lower() in ("off", "none", "-1") else args.metrics_port
    try:
        metrics_port = None if metrics is None else int(metrics)
    except ValueError:
        raise ConfigError(f"--metrics-port: {args.metrics_port!r} is not a port or 'off'") from None
    try:
        token = read_token(args.auth_token_file)
    except OSError as exc:
        raise ConfigError(f"--auth-token-file: {exc.strerror}: {args.auth_token_file}") from None
    except ValueError as exc:
        raise ConfigError(f"--auth-token-file: {exc}") from None
    tokens = _scoped_tokens(args.auth_tokens)
    if args.ucx:
        from store.wire.ucx_transport import UcxUnavailable, context

        try:
            context()
        except UcxUnavailable as exc:
            raise ConfigError(f"--ucx: {exc}") from None
    try:
        limits = Limits(
            args.max_batch,
            parse_size(args.max_chunk_size, "--max-chunk-size"),
            parse_size(args.max_request_size, "--max-request-size"),
        )
        return ServeOptions(
            args.host,
            args.port,
            args.stream_port,
            metrics_port,
            token,
            limits,
            args.drain_timeout,
            args.ucx,
            tokens,
            args.insecure,
            args.metrics_host,
            args.max_connections,
            args.handshake_timeout,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _scoped_tokens(path: str | None) -> tuple[Any, ...]:
    """The entries of ``--auth-tokens FILE`` (store/daemon/auth.py), or none."""
    if not path:
        return ()
    from store.daemon.auth import load_tokens

    return tuple(load_tokens(path))


def client_of(args: argparse.Namespace) -> Any:
    from backends.remote import read_token
    from store.client import KVStoreClient

    try:
        token = read_token(args.auth_token_file)
        return KVStoreClient(args.url, token, timeout=10.0, connect_timeout=3.0)
    except OSError as exc:
        raise ConfigError(f"--auth-token-file: {exc.strerror}: {args.auth_token_file}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def print_stats(reply: Any, url: str, as_json: bool) -> None:
    """The daemon's per-tier figures as a table (or JSON)."""
    rows = [
        {
            "tier": t.tier,
            "items": t.items,
            "used": t.bytes_used,
            "capacity": t.bytes_capacity,
            "hits": t.hits,
            "misses": t.misses,
            "read": t.bytes_read,
            "written": t.bytes_written,
            "evictions": t.evictions,
            "checksum_failures": t.checksum_failures,
            "put_failures": t.put_failures,
        }
        for t in reply.tiers
    ]
    if as_json:
        print(
            json.dumps(
                {
                    "url": url,
                    "uptime_seconds": reply.uptime_seconds,
                    "requests": reply.requests,
                    "in_flight": reply.in_flight,
                    "tiers": rows,
                }
            )
        )
        return
    print(
        f"{url}  up {reply.uptime_seconds:.0f}s  requests {reply.requests}  in flight {reply.in_flight}"
    )
    print(
        f"{'tier':8} {'items':>8} {'used':>10} {'capacity':>10} {'hits':>9} {'misses':>9} "
        f"{'hit%':>6} {'read':>10} {'written':>10} {'evicted':>8} {'bad':>5} {'putfail':>7}"
    )
    for r in rows:
        asked = r["hits"] + r["misses"]
        hit = f"{100 * r['hits'] / asked:5.1f}%" if asked else f"{'-':>6}"
        print(
            f"{r['tier']:8} {_count(r['items']):>8} {_bytes(r['used']):>10} {_bytes(r['capacity']):>10} "
            f"{r['hits']:>9} {r['misses']:>9} {hit:>6} {_bytes(r['read']):>10} {_bytes(r['written']):>10} "
            f"{r['evictions']:>8} {r['checksum_failures']:>5} {r['put_failures']:>7}"
        )


def _count(n: int) -> str:
    return "-" if n < 0 else str(n)


def _bytes(n: int) -> str:
    if n < 0:
        return "-"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
