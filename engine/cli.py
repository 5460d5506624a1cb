"""``engine`` command line: ``engine generate`` and ``engine serve`` (docs/server.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.server.config import ServerConfig
    from store.config import StoreConfig


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="tiny", help="preset name (tiny, bench) or checkpoint directory"
    )
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV cache size, e.g. 512MiB (default: sized for max-num-seqs)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention-backend", default="auto", help="auto, paged (CPU kernel) or sdpa")
    kv = p.add_argument_group("KV connector (save and load KV through a tiered store)")
    kv.add_argument("--kv-connector", default="none", help="none or tiered")
    kv.add_argument("--kv-config", default=None, help="store YAML file (docs/store.md)")
    kv.add_argument("--kv-load-failure-policy", default="recompute", help="recompute or fail")
    kv.add_argument("--kv-load-timeout", type=float, default=5.0, help="seconds a load may take")
    kv.add_argument("--kv-save-decoded", action="store_true", help="also save generated tokens' KV")
    kv.add_argument("--kv-chunk-size", default=None, help="tokens per stored chunk")
    kv.add_argument("--kv-cpu-size", default=None, help="cpu tier size, e.g. 4GiB")
    kv.add_argument("--kv-disk-path", default=None, help="adds a disk tier in this directory")
    kv.add_argument("--kv-disk-size", default=None, help="disk tier size, e.g. 64GiB")
    kv.add_argument(
        "--kv-redis-url", default=None, help="adds a redis/valkey tier, e.g. redis://host:6379/0"
    )


def _tier_flags(args: argparse.Namespace) -> dict[str, str]:
    """The ``--kv-*`` tier flags that were given, as store keys."""
    flags = {
        "chunk_size": args.kv_chunk_size,
        "cpu.size": args.kv_cpu_size,
        "disk.path": args.kv_disk_path,
        "disk.size": args.kv_disk_size,
        "redis.url": args.kv_redis_url,
    }
    return {k: v for k, v in flags.items() if v is not None}


def _flag_tiers(overrides: dict[str, str]) -> set[str]:
    return {t for t in ("cpu", "disk", "redis") if any(k.startswith(t + ".") for k in overrides)}


def kv_config_from_args(args: argparse.Namespace) -> StoreConfig | None:
    """The store config of ``--kv-config`` with the ``--kv-*`` tier flags over it.

    A tier flag adds its tier when the file does not list it (tiers stay fastest first).
    ``--kvstore URL`` (``engine serve``) instead makes the daemon at URL the one tier,
    after any the tier flags add, and implies ``--kv-connector tiered``.
    """
    from store.config import TIERS, ConfigError, StoreConfig

    overrides = _tier_flags(args)
    kvstore = getattr(args, "kvstore", None)
    if kvstore:
        if args.kv_config:
            raise ConfigError(
                "--kvstore and --kv-config exclude each other: list the daemon "
                "in the file's tiers instead"
            )
        args.kv_connector = "tiered"
        tiers = [t for t in TIERS if t in _flag_tiers(overrides)]
        return StoreConfig.load(overrides={**overrides, "tiers": [*tiers, kvstore]})
    if args.kv_connector == "none":
        if overrides or args.kv_config:
            raise ConfigError("--kv-config and the --kv-* tier flags need --kv-connector tiered")
        return None
    base = StoreConfig.load(args.kv_config)
    tiers = set(base.tiers) | _flag_tiers(overrides)
    overrides["tiers"] = [t for t in TIERS if t in tiers]
    return StoreConfig.load(args.kv_config, overrides=overrides)


def engine_kwargs(args: argparse.Namespace, kv_config: StoreConfig | None) -> dict:
    """``EngineConfig`` fields from the engine flags."""
    return dict(
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        kv_connector=args.kv_connector,
        kv_config=kv_config,
        kv_load_failure_policy=args.kv_load_failure_policy,
        kv_load_timeout=args.kv_load_timeout,
        kv_save_decoded=args.kv_save_decoded,
        attention_backend=args.attention_backend,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="engine", description="kvstore inference engine")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    _engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print the output and metrics as JSON")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (docs/server.md)")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one)")
    serve.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: --model)"
    )
    serve.add_argument(
        "--kvstore",
        default=None,
        metavar="kvstore://HOST:PORT",
        help="a kvstore daemon as the KV store (implies --kv-connector tiered)",
    )
    serve.add_argument(
        "--kv-role",
        default="both",
        choices=("both", "producer", "consumer"),
        help="producer: only save KV, consumer: only load it",
    )
    sec = serve.add_argument_group("security and limits (docs/server.md, Security)")
    sec.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health and "
        "/metrics (default: $KVSTORE_API_KEY; unset: no key)",
    )
    sec.add_argument(
        "--max-request-body",
        default=None,
        metavar="SIZE",
        help="largest request body, e.g. 8MiB (default: from --max-model-len)",
    )
    sec.add_argument(
        "--max-chars-per-token",
        type=int,
        default=16,
        help="a text prompt longer than max_model_len x this is refused untokenized",
    )
    sec.add_argument(
        "--tokenizer-threads",
        type=int,
        default=2,
        help="threads that tokenize and render chat templates off the event loop",
    )
    ev = serve.add_argument_group("KV events (for kvrouter --policy prefix_aware)")
    ev.add_argument(
        "--kv-events-endpoint",
        default=None,
        metavar="tcp://*:5557",
        help="publish KV events on this ZMQ endpoint (bound if it has *)",
    )
    ev.add_argument(
        "--kv-events-replay-endpoint",
        default=None,
        metavar="tcp://*:5558",
        help="also answer replay requests here",
    )
    ev.add_argument("--kv-events-topic", default="kv-events")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    from store.config import ConfigError

    try:
        kv_config = kv_config_from_args(args)
    except ConfigError as e:
        print(f"engine: error: {e}", file=sys.stderr)
        return 2

    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=args.stop,
    )
    llm = LLM(args.model, **engine_kwargs(args, kv_config))
    with llm:  # close() finishes pending KV saves before the process exits
        out = llm.generate([args.prompt], params)[0]
    if args.json:
        print(json.dumps({"model": args.model, "prompt": args.prompt, **out.to_dict()}, indent=2))
    else:
        print(out.text)
    return 0


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The HTTP layer's settings; the key from ``--api-key`` or ``$KVSTORE_API_KEY``."""
    from engine.server.config import API_KEY_ENV, ServerConfig
    from store.config import parse_size

    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    body = args.max_request_body
    return ServerConfig(
        api_key=key,
        max_request_body=None if body is None else parse_size(body, "--max-request-body"),
        max_chars_per_token=args.max_chars_per_token,
        tokenizer_threads=args.tokenizer_threads,
    )


def _serve(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.server.chat import ChatTemplateError
    from engine.server.serve import KVEventsConfig, run_server
    from store.config import ConfigError

    try:
        kv_config = kv_config_from_args(args)
        server_config = server_config_from_args(args)
        if args.kv_role != "both" and args.kv_connector == "none":
            raise ConfigError(
                f"--kv-role {args.kv_role} needs a KV connector (--kv-connector "
                "tiered or --kvstore URL)"
            )
        events = None
        if args.kv_events_endpoint:
            events = KVEventsConfig(
                args.kv_events_endpoint, args.kv_events_replay_endpoint, args.kv_events_topic
            )
        config = EngineConfig(
            model=args.model, enable_kv_events=events is not None, **engine_kwargs(args, kv_config)
        )
        run_server(
            config,
            args.host,
            args.port,
            args.served_model_name,
            args.kv_role,
            events,
            server_config,
        )
    except (ConfigError, ChatTemplateError) as e:
        print(f"engine: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, the address is not ours
        print(f"engine: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _serve(args) if args.command == "serve" else _generate(args)
    except EngineError as e:
        print(f"engine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
