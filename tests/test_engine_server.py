"""``engine serve`` as a real process, driven with the official ``openai`` client:
completions and chat, streaming and not, bad input, disconnects, cache salt, reuse."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from engine_server_proc import EngineProc, start_engine

openai = pytest.importorskip("openai")

MAX_LEN = 512


@pytest.fixture(scope="module")
def server():
    srv = start_engine("--model", "tiny", "--max-num-seqs", "8", "--max-model-len", str(MAX_LEN))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server: EngineProc):
    with server.client() as c:
        yield c


def long_prompt(tag: str, words: int = 20) -> str:
    return " ".join(f"{tag}{i % 7} lorem{i}" for i in range(words))


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert server.get("/health") == (200, '{"status": "ok"}')
    status, text = server.get("/metrics")
    assert status == 200 and "engine_kv_blocks_total" in text and "engine_requests_running" in text


def test_completion_streamed_and_not_agree(server, client):
    args = dict(model="tiny", prompt="Hello, world", max_tokens=8, temperature=0)
    full = client.completions.create(**args)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens > 0
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_token_id_prompt(client):
    by_text = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
    ids = [100, 101, 102]  # byte-level ids of some characters; any ids in the vocabulary do
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.usage.prompt_tokens == 3 and by_text.usage.completion_tokens == 4


def test_chat_streamed_and_not_agree_and_use_the_plain_template(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    plain = client.completions.create(
        model="tiny",
        prompt="system: Be brief.\nuser: Hi there\nassistant:",
        max_tokens=6,
        temperature=0,
    )
    assert plain.choices[0].text == full.choices[0].message.content
    assert plain.usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_string_is_cut_in_streams_too(client):
    base = client.completions.create(model="tiny", prompt="stop test", max_tokens=12, temperature=0)
    text = base.choices[0].text
    windows = (text[i : i + 2] for i in range(2, len(text) - 1))
    stop = next((w for w in windows if w.strip() and "\ufffd" not in w), None)
    assert stop is not None, f"no usable stop string in the tiny model's text {text!r}"
    full = client.completions.create(
        model="tiny", prompt="stop test", max_tokens=12, temperature=0, stop=[stop]
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="stop test", max_tokens=12, temperature=0, stop=[stop], stream=True
        )
    )
    assert full.choices[0].finish_reason == "stop"
    assert full.choices[0].text == text[: text.index(stop)] == streamed


BAD = [
    ({"prompt": "hi"}, "model", "missing_required_parameter"),
    ({"model": "tiny"}, "prompt", "missing_required_parameter"),
    ({"model": "gpt-4", "prompt": "hi"}, "model", "model_not_found"),
    ({"model": "tiny", "prompt": 7}, "prompt", "invalid_type"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "5"}, "max_tokens", "invalid_type"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -3}, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": True}, "max_tokens", "invalid_type"),
    ({"model": "tiny", "prompt": "hi", "stream": "yes"}, "stream", "invalid_type"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature", "invalid_value"),
    ({"model": "tiny", "prompt": "hi", "cache_salt": 5}, "cache_salt", "invalid_type"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, "n", "unsupported"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": list(range(3, 3 + MAX_LEN))}, "prompt", "context_length_exceeded"),
]


@pytest.mark.parametrize("body,param,code", BAD, ids=[f"{p}-{c}" for _, p, c in BAD])
def test_bad_completion_requests_get_400_with_openai_error_body(server, body, param, code):
    status, reply = server.post("/v1/completions", body)
    assert status == 400
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error"
    assert (reply["error"]["param"], reply["error"]["code"]) == (param, code)
    assert reply["error"]["message"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": "hi"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x" * 3 * MAX_LEN}]},
            "messages",
        ),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 0,
            },
            "max_completion_tokens",
        ),
    ],
)
def test_bad_chat_requests_get_400(server, body, param):
    status, reply = server.post("/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == param
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]


def test_not_json_and_the_openai_client_sees_bad_request(server, client):
    status, reply = server.post("/v1/completions", b"{not json")
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="hi", max_tokens=-1)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "max_tokens"


def _wait_idle(server: EngineProc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        free, total = (
            server.metric("engine_kv_blocks_free"),
            server.metric("engine_kv_blocks_total"),
        )
        if server.metric("engine_requests_running") == 0 and free == total:
            return
        time.sleep(0.1)
    raise AssertionError(f"blocks not freed: {free} of {total} free")


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server, client):
    _wait_idle(server)
    aborted = server.metric("engine_requests_total", finish_reason="abort")
    stream = client.completions.create(
        model="tiny",
        prompt=long_prompt("dis", 10),
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert server.metric("engine_requests_running") == 1
    assert server.metric("engine_kv_blocks_free") < server.metric("engine_kv_blocks_total")
    stream.close()
    _wait_idle(server)
    assert server.metric("engine_requests_total", finish_reason="abort") == aborted + 1


def test_a_client_that_leaves_before_a_plain_reply_frees_its_blocks(server):
    _wait_idle(server)
    aborted = server.metric("engine_requests_total", finish_reason="abort")
    body = json.dumps(
        {
            "model": "tiny",
            "prompt": long_prompt("plain", 10),
            "max_tokens": 400,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head.encode() + body)
        deadline = time.monotonic() + 20
        while server.metric("engine_requests_running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    _wait_idle(server)
    assert server.metric("engine_requests_total", finish_reason="abort") == aborted + 1


def test_a_repeated_long_prompt_reuses_kv_and_a_cache_salt_isolates_tenants(client):
    prompt = long_prompt("salt")

    def ask(salt: str | None = None):
        extra = {"cache_salt": salt} if salt else None
        return client.completions.create(
            model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body=extra
        )

    first, again = ask(), ask()
    assert first.usage.prompt_tokens > 64
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    reused = again.usage.prompt_tokens_details.cached_tokens
    assert reused >= 64 and again.kv == {"cached_tokens": reused, "sources": {"engine": reused}}
    tenant_b = ask("tenant-b")
    assert tenant_b.usage.prompt_tokens_details.cached_tokens == 0
    assert ask("tenant-b").usage.prompt_tokens_details.cached_tokens == reused
    assert ask("tenant-c").usage.prompt_tokens_details.cached_tokens == 0
    assert {r.choices[0].text for r in (first, again, tenant_b)} == {first.choices[0].text}


def test_streams_report_reuse_in_the_usage_chunk(client):
    prompt = long_prompt("streamreuse")
    client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=2,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].kv["cached_tokens"] == chunks[-1].usage.prompt_tokens_details.cached_tokens


def test_serve_cli_errors_are_one_line_and_exit_2():
    for argv in (
        ["--model", "no-such-model"],
        ["--kvstore", "kvstore://127.0.0.1:1", "--kv-config", "x.yaml"],
        ["--kv-role", "producer"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "engine.cli", "serve", "--port", "0", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and r.stderr.startswith("engine: error:"), r.stderr


def test_concurrent_requests_batch_and_match_their_serial_answers(server, client):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"concurrent {i} " * (i + 1) for i in range(6)]

    def ask(p: str, stream: bool) -> str:
        args = dict(model="tiny", prompt=p, max_tokens=10, temperature=0)
        if not stream:
            return client.completions.create(**args).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))

    serial = [ask(p, False) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts, [i % 2 == 0 for i in range(len(prompts))]))
    assert together == serial
    _wait_idle(server)


def test_kv_events_are_published_for_the_router():
    zmq = pytest.importorskip("zmq")
    import msgpack

    from benchmarks.harness import free_port

    port = free_port()
    srv = start_engine("--model", "tiny", "--kv-events-endpoint", f"tcp://*:{port}")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        sub.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.3)  # let the subscription reach the publisher
        with srv.client() as c:
            c.completions.create(model="tiny", prompt=long_prompt("events", 4), max_tokens=2)
        assert sub.poll(10_000), "no KV event batch"
        topic, seq, payload = sub.recv_multipart()
        _, events, _ = msgpack.unpackb(payload)
        assert topic == b"kv-events" and events[0][0] == "BlockStored"
    finally:
        ctx.destroy(linger=0)
        assert srv.stop() == 0
