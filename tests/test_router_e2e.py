"""End to end on localhost: real ``engine serve --model tiny`` processes behind a real
``kvrouter``; greedy answers through the router equal one engine's."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

import pytest
from router_upstream import RouterProcess, post

from benchmarks.harness import ROOT, Child, free_port, wait_until

pytest.importorskip("engine.server.serve", reason="engine serve has not landed")

PROMPTS = ["the cat sat on the mat and then", "once upon a time " * 5, "x", "hello world, hello"]


class EngineProcess:
    """``engine serve --model tiny`` on a free port (started here, ``wait`` for it)."""

    def __init__(self, *args: str, log=os.devnull) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--model",
            "tiny",
            "--port",
            str(self.port),
            *args,
        ]
        self.proc = Child(cmd, log=log, env={"PYTHONPATH": str(ROOT)})

    def wait(self, timeout: float = 120) -> EngineProcess:
        self.proc.wait_for_http(self.url + "/health", timeout)
        return self

    def stop(self) -> None:
        self.proc.stop(20)


@pytest.fixture
def cleanup():
    items = []
    yield items
    for item in reversed(items):
        item.stop() if isinstance(item, EngineProcess) else item.close()


def greedy(url: str, prompt: str, **extra) -> str:
    status, body, _ = post(
        url + "/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra},
    )
    assert status == 200, body
    return body["choices"][0]["text"]


def streamed(url: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    text = ""
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data: {"):
                text += "".join(c.get("text", "") for c in json.loads(line[6:])["choices"])
    return text


@pytest.mark.parametrize("policy", ["round_robin", "prefix_aware"])
def test_two_engines_behind_the_router_answer_as_one(cleanup, tmp_path, policy):
    engines = [EngineProcess() for _ in range(2)]
    cleanup += engines
    for e in engines:
        e.wait()
    router = RouterProcess(
        free_port(),
        ["--backend", *(e.url for e in engines), "--policy", policy, "--tokenizer", "tiny"],
        tmp_path / "router.log",
    )
    cleanup.append(router)
    reference = [greedy(engines[0].url, p) for p in PROMPTS]
    assert [greedy(router.url, p) for p in PROMPTS] == reference
    assert [streamed(router.url, p) for p in PROMPTS] == reference
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    assert post(router.url + "/v1/chat/completions", chat)[0] == 200


@pytest.mark.parametrize("n_prefill,n_decode", [(1, 1), (2, 2)])
def test_prefill_decode_through_a_shared_kvstore(cleanup, tmp_path, n_prefill, n_decode):
    from daemon_proc import start_daemon

    daemon = start_daemon("--cpu-size", "64MiB")
    try:
        plain = EngineProcess()
        prefill = [
            EngineProcess("--kvstore", daemon.url, "--kv-role", "producer")
            for _ in range(n_prefill)
        ]
        decode = [
            EngineProcess("--kvstore", daemon.url, "--kv-role", "consumer") for _ in range(n_decode)
        ]
        cleanup += [plain, *prefill, *decode]
        for e in (plain, *prefill, *decode):
            e.wait()
        args = [
            "--prefill",
            *(e.url for e in prefill),
            "--decode",
            *(e.url for e in decode),
            "--health-interval",
            "0.5",
        ]
        router = RouterProcess(free_port(), args, tmp_path / "router.log")
        cleanup.append(router)
        reference = [greedy(plain.url, p) for p in PROMPTS]
        assert [greedy(router.url, p) for p in PROMPTS] == reference
        assert [streamed(router.url, p) for p in PROMPTS] == reference
        # A prompt of two whole store chunks (256 tokens each): the producer answers only
        # once they are durable and leased, so the decode node loads them from the daemon.
        for attempt in range(3):  # a remote tier that timed out under load backs off ~1 s
            long = f"the quick brown fox jumps {attempt} " * 21
            body = {"model": "tiny", "prompt": long, "max_tokens": 8, "temperature": 0}
            status, answer, _ = post(router.url + "/v1/completions", body)
            assert status == 200 and answer["choices"][0]["text"] == greedy(plain.url, long)
            if answer["kv"]["sources"].get("remote", 0):
                break
            time.sleep(1.5)
        assert answer["kv"]["sources"].get("remote", 0) == 512, answer["kv"]
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512
        from backends.remote import RemoteBackend

        leases = RemoteBackend(daemon.url)
        # the decode node released its lease
        wait_until(lambda: leases.active_leases() == 0, 10, "the lease to be released")
        leases.close()
        for e in prefill:  # no prefill node left: the decode nodes do everything
            e.stop()
        again = [p + " again" for p in PROMPTS[:2]]
        assert [greedy(router.url, p) for p in again] == [greedy(plain.url, p) for p in again]
    finally:
        daemon.terminate()


def test_engine_killed_mid_stream_gives_a_clean_error(cleanup, tmp_path):
    engines = [EngineProcess() for _ in range(2)]
    cleanup += engines
    for e in engines:
        e.wait()
    args = ["--backend", *(e.url for e in engines), "--health-interval", "60"]
    router = RouterProcess(free_port(), args, tmp_path / "router.log")
    cleanup.append(router)
    body = {"model": "tiny", "prompt": "go", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(
        router.url + "/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        victim = next(e for e in engines if e.url == r.headers["X-Kvrouter-Backend"])
        assert r.readline().startswith(b"data: {")
        victim.proc.kill()
        rest = [line for line in r.read().split(b"\n\n") if line.strip()]
    assert json.loads(rest[-1][6:])["error"]["code"] == "upstream_error"
    survivor = next(e for e in engines if e is not victim)
    for _ in range(2):  # the next requests go elsewhere
        status, answer, headers = post(
            router.url + "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        )
        assert status == 200 and headers["X-Kvrouter-Backend"] == survivor.url
