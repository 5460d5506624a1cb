"""The ``kvstore`` console script: ``serve`` (the daemon), ``stats`` (its table), ``bench``.

Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import NoReturn

from store.config import ConfigError, StoreConfig, parse_size

DEFAULT_TRACE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "mooncake_conversation_trace.jsonl"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kvstore: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvstore", description="Tiered KV-cache store")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("bench", help="tier throughput vs physical baselines, and trace hit ratios")
    b.add_argument(
        "--tiers",
        default="cpu,disk,redis",
        help="comma-separated tiers to measure (cpu, disk, redis)",
    )
    b.add_argument("--sizes", default="64KiB,1MiB,16MiB", help="comma-separated chunk sizes")
    b.add_argument("--total", default="256MiB", help="payload bytes moved per measurement")
    b.add_argument("--config", help="YAML config file (tier settings: disk.path, redis.url, ...)")
    b.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    b.add_argument(
        "--trace", default=DEFAULT_TRACE, help="Mooncake trace (JSONL) for the hit-ratio table"
    )
    b.add_argument(
        "--capacities", default="1000,5000,20000,100000", help="replay capacities in blocks"
    )
    b.add_argument("--trace-limit", type=int, default=None, help="replay only the first N requests")
    b.add_argument("--no-replay", action="store_true", help="skip the trace replay table")
    b.add_argument(
        "--json",
        nargs="?",
        const="kvstore-bench.json",
        default=None,
        metavar="PATH",
        help="also write results as JSON (default path kvstore-bench.json)",
    )
    b.add_argument("--url", help="measure a running daemon (kvstore://host:port) instead of tiers")
    b.add_argument("--auth-token-file", help="with --url: file holding the daemon's bearer token")
    b.add_argument(
        "--transports",
        default="stream,shm,grpc",
        help="with --url: bulk paths to measure (stream, shm, grpc)",
    )
    b.add_argument(
        "--repeats", type=int, default=5, help="with --url: best of this many runs per measurement"
    )
    b.add_argument(
        "--lmcache-venv",
        metavar="DIR",
        help="with --url: also measure LMCache's lmcache_server from this virtual "
        "environment (pip install lmcache there) and report the ratios",
    )
    from store.daemon.commands import add_client_arguments, add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="run the kvstore daemon"))
    st = sub.add_parser("stats", help="print a daemon's per-tier figures")
    add_client_arguments(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _fail(message: str) -> NoReturn:
    print(f"kvstore: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            _fail(f"--set {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _configured(key: str, args: argparse.Namespace) -> bool:
    """Whether ``key`` was set by --set, the environment or the --config file."""
    from store.config import env_var
    from store.config_load import flatten, read_yaml

    if (
        any(pair.partition("=")[0].strip() == key for pair in args.set)
        or env_var(key) in os.environ
    ):
        return True
    return bool(args.config) and key in flatten(read_yaml(args.config))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args)
    if args.command == "stats":
        return _stats(args)
    if args.url:
        return _bench_daemon(args)
    try:
        overrides = _overrides(args.set)
        config = StoreConfig.load(args.config, overrides=overrides)
        tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
        bad = [t for t in tiers if t not in ("cpu", "disk", "redis")]
        if bad or not tiers:
            _fail(
                f"--tiers: {','.join(bad) or 'nothing'} not benchmarkable; choose from cpu, disk, redis"
            )
        sizes = [parse_size(s, "--sizes") for s in args.sizes.split(",") if s.strip()]
        total = parse_size(args.total, "--total")
        capacities = [int(c) for c in args.capacities.split(",") if c.strip()]
    except ConfigError as exc:
        _fail(str(exc))
    except ValueError:
        _fail(f"--capacities: {args.capacities!r} is not a list of integers")
    if not args.no_replay and not os.path.exists(args.trace):
        _fail(f"--trace: {args.trace} does not exist (or pass --no-replay)")
    from store.bench_report import run_bench

    # A private directory for the disk tier's files, unless one was configured.
    scratch = None
    if not _configured("disk.path", args):
        scratch = config.disk.path = tempfile.mkdtemp(prefix="kvstore-bench-", dir="/var/tmp")
    try:
        trace = None if args.no_replay else args.trace
        report = run_bench(config, tiers, sizes, total, trace, capacities, args.trace_limit)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from store.daemon.commands import daemon_config, serve_options
    from store.daemon.serve import run

    try:
        config = daemon_config(args, _overrides(args.set))
        options = serve_options(args)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        return run(config, options)
    except OSError as exc:  # a port in use, a disk path that cannot be created
        _fail(f"cannot start: {exc}")


def _stats(args: argparse.Namespace) -> int:
    from store.daemon.commands import client_of, print_stats
    from store.wire.stream import RemoteError

    try:
        client = client_of(args)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        print_stats(client.stats(), args.url, args.json)
    except RemoteError as exc:
        print(f"kvstore stats: {args.url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def _bench_daemon(args: argparse.Namespace) -> int:
    from kvcore.heap import freeze_startup_heap
    from store.daemon.bench import run_daemon_bench
    from store.daemon.commands import client_of

    try:
        sizes = [parse_size(s, "--sizes") for s in args.sizes.split(",") if s.strip()]
        total = parse_size(args.total, "--total")
        client = client_of(args)
    except ConfigError as exc:
        _fail(str(exc))
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    freeze_startup_heap()  # a client in an engine runs in a heap frozen at start-up too
    bad = [t for t in transports if t not in ("stream", "shm", "grpc")]
    if bad or not transports:
        _fail(f"--transports: {','.join(bad) or 'nothing'}; choose from stream, shm, grpc")
    venv = args.lmcache_venv
    if venv and not os.path.exists(os.path.join(venv, "bin", "python")):
        _fail(
            f"--lmcache-venv {venv}: no bin/python there (python -m venv {venv}; pip install lmcache)"
        )
    try:
        report = run_daemon_bench(
            client, sizes, total, transports, args.lmcache_venv, max(1, args.repeats)
        )
    finally:
        client.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
