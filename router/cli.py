"""``kvrouter`` command line: ``kvrouter serve ...``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kvcore.bearer import API_KEY_ENV  # the same variable as engine serve's
from router.config import DEFAULT_MAX_BODY_BYTES, RouterConfig
from router.policies import POLICY_NAMES
from router.prompt import DEFAULT_PREFIX_TOKENS

BACKEND_API_KEY_ENV = "KVSTORE_BACKEND_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvrouter", description="KV-aware, P/D-aware OpenAI-compatible router"
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the router")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--backend", nargs="+", action="extend", default=[], metavar="URL")
    s.add_argument("--prefill", nargs="+", action="extend", default=[], metavar="URL")
    s.add_argument("--decode", nargs="+", action="extend", default=[], metavar="URL")
    s.add_argument("--policy", choices=POLICY_NAMES, default="round_robin")
    s.add_argument("--api-key", help=f"the bearer token clients must send (or ${API_KEY_ENV})")
    s.add_argument(
        "--api-key-file",
        "--auth-token-file",
        type=Path,
        dest="api_key_file",
        help="a file holding the API key (keeps it out of the process list)",
    )
    s.add_argument(
        "--backend-api-key",
        help=f"the bearer token sent to the backends (or ${BACKEND_API_KEY_ENV})",
    )
    s.add_argument("--backend-api-key-file", type=Path, help="a file holding the backend API key")
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies are refused with 413",
    )
    s.add_argument(
        "--route-prefix-tokens",
        type=int,
        default=DEFAULT_PREFIX_TOKENS,
        help="leading prompt tokens hashed for prefix-aware routing",
    )
    s.add_argument("--model-block-size", type=int, default=16, help="the engines' KV block size")
    s.add_argument(
        "--tokenizer", help="preset name (tiny, bench), checkpoint dir or tokenizer.json"
    )
    s.add_argument(
        "--kv-events",
        nargs="+",
        action="extend",
        default=[],
        metavar="ENDPOINT",
        help="[URL=]tcp://host:port[,tcp://host:replay_port], one per backend in order",
    )
    s.add_argument(
        "--kv-events-topic", default="", help="topic prefix to subscribe to (all by default)"
    )
    s.add_argument("--health-interval", type=float, default=2.0)
    s.add_argument("--health-timeout", type=float, default=2.0)
    s.add_argument("--connect-timeout", type=float, default=3.0)
    s.add_argument("--request-timeout", type=float, default=600.0)
    s.add_argument(
        "--load-alpha",
        type=float,
        default=32.0,
        help="prefix_aware: tokens one in-flight request costs",
    )
    s.add_argument(
        "--load-cap",
        type=int,
        default=4,
        help="prefix_aware: most in-flight requests above the least loaded",
    )
    s.add_argument("--log-level", default="info")
    return p


def read_key(value: str | None, path: Path | None, env: str, what: str) -> str | None:
    """A key from its option, else its file, else the environment (empty there: unset)."""
    if value is not None and path is not None:
        flag = what.replace(" ", "-").lower()
        raise ValueError(f"give --{flag} or --{flag}-file, not both")
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the {what} file: {e}") from None
    return value if value is not None else os.environ.get(env) or None


def config_from_args(a: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        backends=a.backend,
        prefill=a.prefill,
        decode=a.decode,
        policy=a.policy,
        host=a.host,
        port=a.port,
        block_size=a.model_block_size,
        tokenizer=a.tokenizer,
        api_key=read_key(a.api_key, a.api_key_file, API_KEY_ENV, "API key"),
        backend_api_key=read_key(
            a.backend_api_key, a.backend_api_key_file, BACKEND_API_KEY_ENV, "backend API key"
        ),
        max_body_bytes=a.max_body_bytes,
        route_prefix_tokens=a.route_prefix_tokens,
        kv_events=a.kv_events,
        kv_topic=a.kv_events_topic,
        health_interval=a.health_interval,
        health_timeout=a.health_timeout,
        connect_timeout=a.connect_timeout,
        request_timeout=a.request_timeout,
        load_alpha=a.load_alpha,
        load_cap=a.load_cap,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        cfg = config_from_args(args)
        from aiohttp import web

        from router.app import create_app

        app = create_app(cfg)
    except ValueError as e:
        print(f"kvrouter: error: {e}", file=sys.stderr)
        return 2
    # handler_cancellation: a client that leaves cancels its handler, which closes the
    # upstream request, so the engine aborts it instead of generating for nobody.
    web.run_app(
        app, host=cfg.host, port=cfg.port, print=None, access_log=None, handler_cancellation=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
