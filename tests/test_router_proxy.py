"""The router as a real subprocess in front of real aiohttp upstreams on localhost."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import zmq
from router_upstream import RouterProcess, get, post

from benchmarks.harness import wait_until


def complete(router: RouterProcess, body: dict | None = None, **kw):
    return post(router.url + "/v1/completions", body or {"model": "tiny", "prompt": "hi"}, **kw)


def test_round_robin_alternates(ups, start_router):
    a, b = ups.start("a"), ups.start("b")
    r = start_router("--backend", a.url, b.url)
    answers = [complete(r)[1]["backend"] for _ in range(4)]
    assert answers == ["a", "b", "a", "b"]
    status, _, headers = post(
        r.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 200 and headers["X-Kvrouter-Backend"] == a.url
    assert a.headers[0]["x-request-id"]  # the router names every request upstream


def test_retry_on_another_backend_when_one_is_down(ups, start_router):
    a, b = ups.start("a"), ups.start("b")
    r = start_router("--backend", a.url, b.url, "--health-interval", "60")
    ups.stop("a")  # the router still believes a is healthy
    assert [complete(r)[1]["backend"] for _ in range(3)] == ["b", "b", "b"]
    _, metrics = get(r.url + "/metrics")
    assert f'kvrouter_backend_errors_total{{backend="{a.url}"}} 1.0' in metrics
    assert f'kvrouter_backend_healthy{{backend="{a.url}"}} 0.0' in metrics
    ups.stop("b")
    status, body, _ = complete(r)
    assert status == 502 and body["error"]["code"] == "no_backend"  # b was tried and failed
    status, body, _ = complete(r)
    assert status == 503 and body["error"]["code"] == "no_backend"  # none left to try


def test_unhealthy_backends_take_no_requests(ups, start_router):
    a, b = ups.start("a"), ups.start("b")
    a.healthy = False
    r = start_router("--backend", a.url, b.url, "--health-interval", "0.2")
    assert [complete(r)[1]["backend"] for _ in range(4)] == ["b"] * 4
    assert a.requests == []
    a.healthy = True
    wait_until(lambda: json.loads(get(r.url + "/health")[1])["backends"][a.url]["healthy"])
    assert {complete(r)[1]["backend"] for _ in range(2)} == {"a", "b"}


def test_streaming_passes_bytes_as_they_come(ups, start_router):
    a = ups.start("a")
    a.stream_pause = 1.5
    r = start_router("--backend", a.url)

    async def stream():
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            body = {"prompt": "hi", "stream": True}
            async with s.post(r.url + "/v1/completions", json=body) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                first = await resp.content.readuntil(b"\n\n")
                t_first = time.monotonic() - t0
                rest = await resp.content.read()
        return first, t_first, rest, time.monotonic() - t0

    first, t_first, rest, total = asyncio.run(stream())
    assert first == b'data: {"backend": "a", "part": 1}\n\n'
    assert t_first < 1.0 < 1.5 <= total  # the first event did not wait for the second
    assert rest == b'data: {"backend": "a", "part": 2}\n\ndata: [DONE]\n\n'


def test_backend_dying_mid_stream_gives_a_clean_error(ups, start_router):
    a, b = ups.start("a"), ups.start("b")
    a.die_mid_stream = True
    r = start_router("--backend", a.url, b.url, "--health-interval", "60")

    async def stream() -> bytes:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                r.url + "/v1/completions", json={"prompt": "x", "stream": True}
            ) as resp:
                return await resp.content.read()

    data = asyncio.run(stream())
    events = [json.loads(e[6:]) for e in data.decode().strip().split("\n\n")]
    assert events[0] == {"backend": "a", "part": 1}
    assert events[1]["error"]["code"] == "upstream_error" and len(events) == 2
    assert [complete(r)[1]["backend"] for _ in range(2)] == ["b", "b"]  # a is out


@pytest.mark.parametrize(
    ("path", "raw", "param", "message"),
    [
        ("/v1/completions", b"{not json", None, "the request body is not valid JSON"),
        ("/v1/completions", b"[1, 2]", None, "the request body must be a JSON object"),
        ("/v1/completions", b'{"model": "tiny"}', "prompt", "'prompt' is required"),
        ("/v1/completions", b'{"prompt": []}', "prompt", "'prompt' must be"),
        (
            "/v1/completions",
            b'{"prompt": "x", "stream": "yes"}',
            "stream",
            "'stream' must be a boolean",
        ),
        (
            "/v1/completions",
            b'{"prompt": "x", "max_tokens": -1}',
            "max_tokens",
            "'max_tokens' must be",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": []}',
            "messages",
            "'messages' must be a non-empty list",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"content": "x"}]}',
            "messages",
            "messages[0] must be",
        ),
    ],
)
def test_bad_input_is_400_with_an_openai_body(ups, start_router, path, raw, param, message):
    a = ups.start("a")
    r = start_router("--backend", a.url)
    status, body, _ = post(r.url + path, None, raw=raw)
    assert status == 400
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"].startswith(message)
    assert a.requests == []


def test_backend_client_errors_pass_through_unretried(ups, start_router):
    a, b = ups.start("a"), ups.start("b")
    r = start_router("--backend", a.url, b.url)
    status, body, _ = complete(r, {"prompt": "bad"})
    assert status == 400 and body["error"]["message"] == "bad prompt"
    assert len(a.requests) + len(b.requests) == 1


def test_bearer_token(ups, start_router, tmp_path):
    a = ups.start("a")
    (tmp_path / "token").write_text("s3cret\n")
    r = start_router("--backend", a.url, "--auth-token-file", str(tmp_path / "token"))
    for token in (None, "wrong"):
        status, body, _ = complete(r, token=token)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = complete(r, token="s3cret")
    assert status == 200 and body["backend"] == "a"
    assert "authorization" not in a.headers[-1]  # the client's key stays with the router
    assert get(r.url + "/health")[0] == 200 and get(r.url + "/metrics")[0] == 200


def test_models_health_metrics(ups, start_router):
    a = ups.start("a")
    r = start_router("--backend", a.url)
    status, text = get(r.url + "/v1/models")
    assert status == 200 and json.loads(text)["data"][0]["id"] == "tiny"
    health = json.loads(get(r.url + "/health")[1])
    assert health == {
        "status": "ok",
        "backends": {a.url: {"role": "both", "healthy": True, "in_flight": 0}},
    }
    complete(r)
    metrics = get(r.url + "/metrics")[1]
    assert f'kvrouter_backend_requests_total{{backend="{a.url}"}} 1.0' in metrics
    assert 'kvrouter_predicted_hit_tokens_count{policy="round_robin"} 1.0' in metrics
    status, body, _ = post(r.url + "/v2/nothing", {})
    assert status == 404 and body["error"]["code"] == "not_found"


def test_prefill_then_decode(ups, start_router):
    p, d = ups.start("p"), ups.start("d")
    r = start_router("--prefill", p.url, "--decode", d.url)
    status, body, _ = complete(
        r,
        {
            "prompt": "hello",
            "max_tokens": 8,
            "stream": False,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200 and body["backend"] == "d"
    leg = p.requests[0]
    assert leg["max_tokens"] == 1 and leg["stream"] is False and "stream_options" not in leg
    assert leg["kv_transfer_params"]["do_remote_decode"] is True
    assert d.requests[0]["kv_transfer_params"] == {
        "do_remote_prefill": True,
        "remote_engine_id": "p",
        "remote_block_ids": [1, 2],
    }
    assert (
        d.requests[0]["max_tokens"] == 8
        and p.headers[0]["x-request-id"] == d.headers[0]["x-request-id"]
    )


def test_decode_does_everything_without_a_prefill_node(ups, start_router):
    p, d = ups.start("p"), ups.start("d")
    r = start_router("--prefill", p.url, "--decode", d.url, "--health-interval", "60")
    ups.stop("p")
    status, body, _ = complete(r, {"prompt": "hello", "max_tokens": 4})
    assert status == 200 and body["backend"] == "d"
    assert "kv_transfer_params" not in d.requests[0] and d.requests[0]["max_tokens"] == 4
    assert "kvrouter_pd_fallbacks_total 1.0" in get(r.url + "/metrics")[1]


def test_prefix_aware_follows_kv_events(ups, start_router):
    from engine.kv_publisher import KVEventPublisher
    from kvcore.events import BlockStored
    from kvcore.keys import block_hashes

    a, b = ups.start("a"), ups.start("b")
    pub = KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    replay = pub._replay.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        r = start_router(
            "--backend",
            a.url,
            b.url,
            "--policy",
            "prefix_aware",
            "--kv-events",
            f"{b.url}={pub.endpoint},{replay}",
        )
        prompt = list(range(10, 74))  # 4 blocks of 16
        hashes = block_hashes(prompt, 16)
        stored = BlockStored(hashes, None, prompt, 16)
        for _ in range(50):  # until the router has it (ZMQ drops what precedes a subscriber)
            pub.publish([stored])
            if "kvrouter_kv_events_total" in get(r.url + "/metrics")[1]:
                break
            time.sleep(0.1)
        assert [complete(r, {"prompt": prompt})[1]["backend"] for _ in range(3)] == ["b"] * 3
        assert {complete(r, {"prompt": [7] * 64})[1]["backend"] for _ in range(4)} == {"a", "b"}
        metrics = get(r.url + "/metrics")[1]
        assert 'kvrouter_predicted_hit_tokens_sum{policy="prefix_aware"} 192.0' in metrics
    finally:
        pub.close()
