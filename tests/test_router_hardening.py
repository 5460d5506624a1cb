"""Attacks on ``kvrouter`` (issue 13): bodies too big or too deep, text that is slow to
tokenize, bad Unicode, and requests that make a backend fail. Each must cost the router a
small, bounded amount and fail alone."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import urllib.request

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from router_upstream import RouterProcess, Upstream, Upstreams, post

from benchmarks.harness import free_port
from kvcore.keys import block_hashes
from router.app import HASHER, create_app
from router.config import RouterConfig
from router.prompt import PromptHasher, load_tokenizer


@pytest.fixture(scope="module")
def tokenizing_router(tmp_path_factory):
    """A router that tokenizes text (prefix_aware with a tokenizer, where bad Unicode would
    bite) in front of one upstream, shared by the bad-input cases: (router, upstream)."""
    u = Upstreams()
    a = u.start("a")
    log = tmp_path_factory.mktemp("router") / "router.log"
    r = RouterProcess(
        free_port(), ["--backend", a.url, "--policy", "prefix_aware", "--tokenizer", "tiny"], log
    )
    yield r, a
    r.close()
    u.close()


def assert_openai_error(status: int, body: dict, want_status: int, code: str | None = None):
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code


def chunked_post(url: str, chunks: list[bytes]) -> tuple[int, dict]:
    """POST with ``Transfer-Encoding: chunked`` (no Content-Length) over a raw socket."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        try:
            for c in chunks:
                s.sendall(b"%x\r\n%s\r\n" % (len(c), c))
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the router may answer and close before the whole body was sent
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"chunked" in head.lower():
        size, _, rest = rest.partition(b"\r\n")
        rest = rest[: int(size, 16)]
    return status, json.loads(rest)


# --- item 5: bounded bodies, bounded and off-the-loop tokenization, bad JSON -----------


def test_oversized_body_is_413_with_an_openai_body(ups, start_router):
    a = ups.start("a")
    r = start_router("--backend", a.url, "--max-body-bytes", "65536")
    big = json.dumps({"prompt": "x" * 100_000}).encode()
    status, body, _ = post(r.url + "/v1/completions", None, raw=big)
    assert_openai_error(status, body, 413, "request_too_large")
    assert "65536" in body["error"]["message"]
    status, body = chunked_post(
        r.url + "/v1/completions", [big[i : i + 8192] for i in range(0, len(big), 8192)]
    )
    assert_openai_error(status, body, 413, "request_too_large")
    bomb = gzip.compress(b'{"prompt": "' + b"x" * (64 << 20) + b'"}')  # 64 MiB in ~64 kB
    req = urllib.request.Request(r.url + "/v1/completions", bomb, {"Content-Encoding": "gzip"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert_openai_error(e.value.code, json.loads(e.value.read()), 413, "request_too_large")
    assert a.requests == []
    status, body, _ = post(r.url + "/v1/completions", {"prompt": "x" * 60_000})
    assert status == 200 and body["backend"] == "a"  # under the limit: routed


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"prompt": [1, NaN]}', "NaN is not a JSON number"),
        (b'{"prompt": "a\\ud800b"}', "lone surrogate"),
        (b'{"prompt": "\xed\xa0\x80"}', "not valid UTF-8"),
        (b'{"prompt": "x", "stop": ["\\udfff"]}', "lone surrogate"),
        (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "lone surrogate"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', "text"),
    ],
    ids=[
        "deep-array",
        "deep-prompt",
        "nan",
        "escaped-surrogate",
        "utf8-surrogate",
        "surrogate-in-stop",
        "surrogate-in-chat",
        "non-string-part",
    ],
)
def test_deep_json_and_bad_unicode_are_400(tokenizing_router, raw, message):
    r, a = tokenizing_router
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    seen = len(a.requests)
    status, body, _ = post(r.url + path, None, raw=raw)
    assert_openai_error(status, body, 400)
    assert message in body["error"]["message"]
    assert len(a.requests) == seen
    status, body, _ = post(r.url + "/v1/completions", None, raw=b'{"prompt": "\\ud83d\\ude00"}')
    assert status == 200 and a.requests[-1]["prompt"] == "\U0001f600"  # a pair is fine


def test_long_prompts_are_hashed_by_their_first_tokens():
    tok = load_tokenizer("tiny")
    hasher = PromptHasher(16, tok, max_tokens=1024)
    ids = list(range(5000))
    assert hasher.hashes({"prompt": ids}, chat=False) == block_hashes(ids[:1024], 16)
    text = "the quick brown fox jumps over the lazy dog " * 1000  # 44 kB, 10x what is tokenized
    engine_hashes = block_hashes(tok.encode(text), 16)  # what the engine computes
    got = hasher.hashes({"prompt": text}, chat=False)
    assert 32 <= len(got) <= 64 and got == engine_hashes[: len(got)]
    chat = {"messages": [{"role": "user", "content": text}] * 3}
    got = hasher.hashes(chat, chat=True)
    assert 32 <= len(got) <= 64
    assert got == block_hashes(tok.encode("user: " + text[:10_000]), 16)[: len(got)]


class GatedTokenizer:
    """The real tokenizer, but a long text waits (up to 10 s) for the test to open a gate:
    while it waits, the test checks that the router still serves other requests."""

    def __init__(self, tok) -> None:
        self.tok, self.gate, self.entered = tok, threading.Event(), threading.Event()
        self.waiting = False

    def encode(self, text: str) -> list[int]:
        if len(text) > 10_000:
            self.waiting = True
            self.entered.set()
            self.gate.wait(10)
            self.waiting = False
        return self.tok.encode(text)


def test_tokenizing_a_long_prompt_does_not_stall_other_requests():
    async def scenario() -> tuple[bool, int, int]:
        up = Upstream("a", asyncio.get_running_loop())
        await up.start()
        app = create_app(RouterConfig(backends=[up.url], policy="prefix_aware"))
        gated = app[HASHER].tokenizer = GatedTokenizer(load_tokenizer("tiny"))
        server = TestServer(app)
        await server.start_server()
        url = str(server.make_url("/v1/completions"))
        try:
            async with aiohttp.ClientSession() as s:
                big = asyncio.create_task(s.post(url, json={"prompt": "y" * 1_000_000}))
                await asyncio.to_thread(gated.entered.wait, 10)
                async with s.post(url, json={"prompt": [1, 2, 3]}) as r:
                    small_status = r.status
                served_while_tokenizing = gated.waiting  # read before opening the gate
                gated.gate.set()
                async with await big as r:
                    big_status = r.status
        finally:
            gated.gate.set()
            await server.close()
            await up.stop()
        return served_while_tokenizing, small_status, big_status

    served_while_tokenizing, small_status, big_status = asyncio.run(scenario())
    assert small_status == 200 and big_status == 200
    assert served_while_tokenizing  # the loop routed a request while a tokenizer ran


# --- item 1, router side: a request that makes a backend fail is not retried -----------


def test_a_poison_request_reaches_one_backend(ups, start_router):
    a, b, c = ups.start("a"), ups.start("b"), ups.start("c")
    r = start_router("--backend", a.url, b.url, c.url, "--health-interval", "60")
    status, body, headers = post(r.url + "/v1/completions", {"prompt": "poison"})
    assert status == 500 and body["error"]["message"] == "engine failed"  # the backend's own
    assert headers["X-Kvrouter-Backend"] == a.url
    status, body, _ = post(r.url + "/v1/completions", {"prompt": "crash"})
    assert_openai_error(status, body, 502, "upstream_error")  # b took it and died
    assert [len(u.requests) for u in (a, b, c)] == [1, 1, 0]
    # a answered (it is alive), so it still takes requests; b cut the connection: it is out
    answers = [post(r.url + "/v1/completions", {"prompt": "hi"})[1]["backend"] for _ in range(4)]
    assert set(answers) == {"a", "c"}


def test_a_poison_request_reaches_one_prefill_and_one_decode_node(ups, start_router):
    p1, p2, d1, d2 = (ups.start(n) for n in ("p1", "p2", "d1", "d2"))
    r = start_router(
        "--prefill", p1.url, p2.url, "--decode", d1.url, d2.url, "--health-interval", "60"
    )
    status, body, _ = post(r.url + "/v1/completions", {"prompt": "poison"})
    assert status == 500 and body["error"]["message"] == "engine failed"
    assert len(p1.requests) + len(p2.requests) == 1  # the prefill leg was not retried
    assert len(d1.requests) + len(d2.requests) == 1  # the decode node tried it once, alone
    ups.stop("p1"), ups.stop("d1")  # a node that cannot be reached is still skipped
    status, body, _ = post(r.url + "/v1/completions", {"prompt": "hi"})
    assert status == 200 and body["backend"] == "d2"
    assert p2.requests[-1]["kv_transfer_params"]["do_remote_decode"]
