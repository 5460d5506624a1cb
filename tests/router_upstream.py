"""Small real aiohttp servers standing in for engines behind the router, and a router
subprocess to put in front of them (shared by the tests/test_router_*.py files)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

from aiohttp import web

from benchmarks.harness import ROOT, Child, http_request


class Upstream:
    """One fake engine: answers with its name, streams SSE, and records what it got."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name, self.loop = name, loop
        self.healthy = True
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.probe_headers: list[dict] = []  # of /health, /metrics and /v1/models calls
        self.stream_pause = 0.0  # seconds between the two content chunks of a stream
        self.die_mid_stream = False
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        return app

    async def start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    def _probed(self, request: web.Request) -> None:
        self.probe_headers.append({k.lower(): v for k, v in request.headers.items()})

    async def _health(self, request: web.Request) -> web.Response:
        self._probed(request)
        return web.Response(status=200 if self.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        self._probed(request)
        return web.Response(text="engine_requests_running 0\n")

    async def _models(self, request: web.Request) -> web.Response:
        self._probed(request)
        return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if body.get("prompt") == "bad":
            err = {
                "error": {
                    "message": "bad prompt",
                    "type": "invalid_request_error",
                    "param": "prompt",
                    "code": None,
                }
            }
            return web.json_response(err, status=400)
        if body.get("prompt") == "poison":  # an input that makes the engine fail
            return web.json_response(
                {
                    "error": {
                        "message": "engine failed",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=500,
            )
        if body.get("prompt") == "crash":  # an input that kills the engine mid-request
            request.transport.close()
            return web.Response()
        answer = {"backend": self.name, "choices": [{"index": 0, "text": f"from {self.name}"}]}
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):
            answer["kv_transfer_params"] = {
                "do_remote_prefill": True,
                "remote_engine_id": self.name,
                "remote_block_ids": [1, 2],
            }
        if not body.get("stream"):
            return web.json_response(answer)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: {json.dumps({'backend': self.name, 'part': 1})}\n\n".encode())
        if self.die_mid_stream:
            request.transport.close()
            return resp
        await asyncio.sleep(self.stream_pause)
        await resp.write(f"data: {json.dumps({'backend': self.name, 'part': 2})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class Upstreams:
    """Upstreams served by an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: dict[str, Upstream] = {}

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self, name: str) -> Upstream:
        up = self.servers[name] = Upstream(name, self.loop)
        self.call(up.start())
        return up

    def stop(self, name: str) -> None:
        self.call(self.servers[name].stop())

    def close(self) -> None:
        for up in self.servers.values():
            try:
                self.call(up.stop())
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class RouterProcess:
    """``kvrouter serve`` as a subprocess on a free port."""

    def __init__(
        self, port: int, args: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "router.cli", "serve", "--port", str(port), *args]
        self.proc = Child(cmd, log=log_path, env={**(env or {}), "PYTHONPATH": str(ROOT)})
        # any answer will do: 503 until a backend is healthy
        self.proc.wait_for_http(self.url + "/health", 30, any_status=True)

    def close(self) -> None:
        self.proc.stop(10)


def post(
    url: str, body, token: str | None = None, raw: bytes | None = None
) -> tuple[int, dict, dict]:
    """POST JSON; (status, parsed body, headers). A body that is not JSON comes back as
    ``{"not_json": text}`` so that a test fails on its assertion, not in here."""
    data = raw if raw is not None else json.dumps(body).encode()
    reply = http_request(url, "POST", data, _headers(token, "application/json"), timeout=30)
    try:
        return reply.status, reply.json(), reply.headers
    except ValueError:
        return reply.status, {"not_json": reply.text}, reply.headers


def get(url: str, token: str | None = None) -> tuple[int, str]:
    """GET; (status, body text)."""
    reply = http_request(url, headers=_headers(token), timeout=10)
    return reply.status, reply.text


def _headers(token: str | None, content_type: str | None = None) -> dict[str, str | None]:
    auth = f"Bearer {token}" if token else None
    return {"Content-Type": content_type, "Authorization": auth}
