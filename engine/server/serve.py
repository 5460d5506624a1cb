"""``engine serve``: one engine, its loop thread and the HTTP server, until SIGTERM/SIGINT.

On start it prints one line (tests and scripts wait for it)::

    engine serve: http://127.0.0.1:8000 model tiny kv tiered role both
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from dataclasses import dataclass

from aiohttp import web

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.server.app import CONTEXT, ServerContext, make_app
from engine.server.chat import ChatTemplate
from engine.server.config import ServerConfig
from engine.server.metrics import ServerMetrics
from kvcore.heap import freeze_startup_heap


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """Where to publish the engine's KV events (ZMQ, vLLM's wire; ``engine/kv_publisher.py``)."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = "kv-events"


def run_server(
    config: EngineConfig,
    host: str,
    port: int,
    served_model_name: str | None = None,
    kv_role: str = "both",
    kv_events: KVEventsConfig | None = None,
    server_config: ServerConfig | None = None,
) -> None:
    """Serve ``config``'s model on ``host:port`` until SIGTERM or SIGINT, then finish
    in-flight responses' KV saves and exit. ``port`` 0 picks a free port. With
    ``kv_events`` (and ``config.enable_kv_events``) every step's KV events are published.
    ``kv_role`` (if not ``both``) overrides ``config.kv_role``. ``server_config``: the API
    key and request limits (default: no key, limits derived from the context)."""
    if kv_role != "both":
        config = dataclasses.replace(config, kv_role=kv_role)  # validated again
    kv_role = config.kv_role
    chat_template = ChatTemplate.for_model(config.model)  # a broken template fails at start
    llm_engine = LLMEngine(config)
    publisher = None
    if kv_events is not None:
        from engine.kv_publisher import KVEventPublisher

        publisher = KVEventPublisher(kv_events.endpoint, kv_events.replay_endpoint, kv_events.topic)
    after_step = (
        None if publisher is None else lambda: publisher.publish(llm_engine.take_kv_events())
    )
    engine = AsyncEngine(llm_engine, after_step)
    freeze_startup_heap()  # model loaded, KV cache allocated: what is alive now stays
    name = served_model_name or config.model
    context = ServerContext(
        engine, name, chat_template, ServerMetrics(name), server_config or ServerConfig()
    )
    engine.start()
    try:
        asyncio.run(
            _serve(
                make_app(context),
                host,
                port,
                f"model {name} kv {config.kv_connector} role {kv_role}",
            )
        )
    finally:
        engine.close()
        if publisher is not None:
            publisher.close()


async def _serve(app: web.Application, host: str, port: int, banner: str) -> None:
    # handler_cancellation: a client that disconnects cancels its handler at once, which
    # aborts its request even while it waits for the next token (not only on a write).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"engine serve: http://{bound_host}:{bound_port} {banner}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and app[CONTEXT].config.api_key is None:
        print(
            f"engine serve: warning: listening on {host} without an API key "
            "(--api-key or KVSTORE_API_KEY)",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
