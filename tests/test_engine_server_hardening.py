"""Issue 13 on ``engine serve``: no request can stop, stall or poison the server.

A real ``engine serve --model tiny`` process each: a seed outside 64 bits or a tiny
temperature once ended the engine loop (every later request a 503); bodies that made
500s (deep JSON, a lone surrogate, a 5000-digit number) are 400s; oversized bodies and
texts are refused before they cost anything (413/400), and a long text is tokenized off
the event loop; ``max_tokens`` past the context is a 400; ``--api-key`` guards all but
the probes."""

from __future__ import annotations

import json
import threading
import time

import pytest
from engine_server_proc import start_engine
from http_raw import is_error_body, post, request

openai = pytest.importorskip("openai")

MAX_LEN = 512
KEY = "s3cret-key"
GOOD = {"model": "tiny", "prompt": "Hello, world", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    srv = start_engine("--model", "tiny", "--max-model-len", str(MAX_LEN))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def keyed():
    # 1024 chars per token: a 1M-character prompt passes the text limit and is tokenized
    srv = start_engine(
        "--model",
        "tiny",
        "--max-model-len",
        "1024",
        "--max-chars-per-token",
        "1024",
        "--max-request-body",
        "4MiB",
        env={"KVSTORE_API_KEY": KEY},
    )
    yield srv
    assert srv.stop() == 0


def _error(reply, status: int, expected_status: int, param=None, code=None) -> dict:
    assert status == expected_status and is_error_body(reply), (status, reply)
    err = reply["error"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def _still_serving(port: int, headers: dict | None = None) -> str:
    status, reply = post(port, "/v1/completions", GOOD, headers=headers)
    assert status == 200, reply
    assert request(port, "GET", "/health")[0] == 200
    return reply["choices"][0]["text"]


def test_a_seed_outside_64_bits_is_a_400_and_the_engine_goes_on(server):
    baseline = _still_serving(server.port)
    for seed in (2**64, 2**63, -(2**63) - 1, 18446744073709551616):
        status, reply = post(server.port, "/v1/completions", {**GOOD, "seed": seed}, timeout=30)
        _error(reply, status, 400, "seed", "invalid_value")
    for seed in (2**63 - 1, -(2**63)):  # the edges are seeds
        status, reply = post(
            server.port, "/v1/completions", {**GOOD, "temperature": 1.0, "seed": seed}
        )
        assert status == 200, reply
    assert _still_serving(server.port) == baseline


def test_a_tiny_temperature_does_not_poison_the_engine(server):
    for t in (1e-300, 5e-324, 1e-9):  # logits / t overflow: NaN probabilities in the sampler
        status, reply = post(server.port, "/v1/completions", {**GOOD, "temperature": t})
        assert status == 200 and reply["usage"]["completion_tokens"] == 6, reply
    _still_serving(server.port)


BAD_BODIES = [
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    (
        "deep-nesting-in-field",
        b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "invalid_json",
    ),
    (
        "5000-digit-int",
        b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        "invalid_json",
    ),
    ("nan", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "invalid_json"),
    ("infinity", b'{"model": "tiny", "prompt": "hi", "top_p": -Infinity}', "invalid_json"),
    ("lone-surrogate-prompt", b'{"model": "tiny", "prompt": "ab\\ud800cd"}', "invalid_unicode"),
    (
        "lone-surrogate-salt",
        b'{"model": "tiny", "prompt": "' + b"x" * 64 + b'", "cache_salt": "\\udfff"}',
        "invalid_unicode",
    ),
    (
        "lone-surrogate-stop",
        b'{"model": "tiny", "prompt": "hi", "stop": ["\\uDBFF"]}',
        "invalid_unicode",
    ),
    ("bad-utf8", b'{"model": "tiny", "prompt": "\xff\xfe"}', "invalid_json"),
    ("truncated", json.dumps(GOOD).encode()[:-7], "invalid_json"),
]


@pytest.mark.parametrize("body,code", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_bodies_that_made_500s_are_400s(server, body, code):
    status, reply = post(server.port, "/v1/completions", body)
    _error(reply, status, 400, None, code)


def test_a_pair_of_surrogates_is_text(server):
    body = b'{"model": "tiny", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    assert post(server.port, "/v1/completions", body)[0] == 200


def test_content_types_other_than_json_are_415(server):
    body = json.dumps(GOOD).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, reply = post(server.port, "/v1/completions", body, headers={"Content-Type": ctype})
        _error(reply, status, 415, None, "unsupported_media_type")
    for ctype in ("application/json; charset=utf-8", None):  # no type: curl --data-binary
        status, _ = post(server.port, "/v1/completions", body, headers={"Content-Type": ctype})
        assert status == 200


def test_an_oversized_body_is_413_before_it_is_read(server):
    limit = (1 << 20) + 6 * 16 * MAX_LEN  # the default for --max-model-len 512
    big = json.dumps({**GOOD, "prompt": "x" * limit}).encode()
    status, reply = post(server.port, "/v1/completions", big)
    err = _error(reply, status, 413, None, "request_too_large")
    assert str(limit) in err["message"]
    # chunked, with no Content-Length: stopped at the limit by aiohttp
    status, reply = request(
        server.port,
        "POST",
        "/v1/completions",
        iter([big[:limit], big[limit:]]),
        headers={"Transfer-Encoding": "chunked"},
    )
    _error(reply, status, 413, None, "request_too_large")
    _still_serving(server.port)


def test_a_text_longer_than_the_context_can_hold_is_refused_untokenized(server):
    for key, body in (
        ("prompt", {**GOOD, "prompt": "y" * (16 * MAX_LEN + 1)}),
        (
            "messages",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "z" * (8 * MAX_LEN + 1)}] * 2,
            },
        ),
    ):
        path = "/v1/completions" if key == "prompt" else "/v1/chat/completions"
        status, reply = post(server.port, path, body)
        err = _error(reply, status, 400, key, "context_length_exceeded")
        assert "characters" in err["message"]


def test_max_tokens_past_the_context_is_a_400_and_the_default_fits(server):
    ids = [5 + i % 300 for i in range(MAX_LEN - 10)]  # leaves 10 tokens of room
    status, reply = post(server.port, "/v1/completions", {**GOOD, "prompt": ids, "max_tokens": 11})
    err = _error(reply, status, 400, "max_tokens", "context_length_exceeded")
    assert f"maximum context length is {MAX_LEN} tokens" in err["message"]
    assert "502 input tokens" in err["message"]
    status, reply = post(
        server.port,
        "/v1/completions",
        {**GOOD, "prompt": ids, "max_tokens": 10, "ignore_eos": True},
    )
    assert status == 200 and reply["usage"]["completion_tokens"] == 10
    msgs = [{"role": "user", "content": "q" * (MAX_LEN - 20)}]
    status, reply = post(
        server.port,
        "/v1/chat/completions",
        {"model": "tiny", "messages": msgs, "max_completion_tokens": 400},
    )
    _error(reply, status, 400, "max_completion_tokens", "context_length_exceeded")
    # no max_tokens: the default (16 for completions, the context for chat) is cut to fit
    status, reply = post(
        server.port, "/v1/completions", {"model": "tiny", "prompt": ids, "ignore_eos": True}
    )
    assert status == 200 and reply["usage"]["completion_tokens"] == 10
    status, reply = post(
        server.port, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "ignore_eos": True}
    )
    assert status == 200 and reply["usage"]["total_tokens"] == MAX_LEN, reply


def test_stop_lists_are_bounded(server):
    for body in (
        {**GOOD, "stop": ["a"] * 17},
        {**GOOD, "stop": "s" * 257},
        {**GOOD, "stop_token_ids": list(range(257))},
    ):
        status, reply = post(server.port, "/v1/completions", body)
        _error(reply, status, 400, next(k for k in ("stop", "stop_token_ids") if k in body))


def test_the_api_key_guards_everything_but_the_probes(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert request(keyed.port, "GET", "/health")[0] == 200
    assert request(keyed.port, "GET", "/metrics")[0] == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/nowhere"),
        ):
            # the body is not even JSON: the key is checked before the body is read
            status, reply = request(keyed.port, method, path, b"{nope", headers=headers)
            err = _error(reply, status, 401, None, "invalid_api_key")
            assert err["type"] == "invalid_request_error"
    assert request(keyed.port, "GET", "/v1/models", headers=auth)[0] == 200
    with keyed.client() as c:  # the openai client with the wrong key, then the right one
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    import openai as oa

    with oa.OpenAI(base_url=keyed.base_url, api_key=KEY, max_retries=0) as c:
        r = c.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    _still_serving(keyed.port, auth)


def test_a_long_text_is_tokenized_off_the_event_loop(keyed):
    """A 1M-character prompt takes the tokenizer about a second; /health answers meanwhile
    (before, the event loop was frozen until the tokenizer finished)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "".join("abcdefgh ijklmnop"[(i * 7919) % 17] for i in range(1_000_000))
    done: dict[str, float] = {}

    def big() -> None:
        status, reply = post(keyed.port, "/v1/completions", {**GOOD, "prompt": text}, headers=auth)
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
        done["big"] = time.monotonic()

    t = threading.Thread(target=big)
    t.start()
    time.sleep(0.3)  # the body is sent and being tokenized
    assert request(keyed.port, "GET", "/health")[0] == 200
    done["health"] = time.monotonic()
    t.join(60)
    assert done["health"] < done["big"], done


@pytest.mark.parametrize(
    "argv,key",
    [
        (["--api-key", ""], "api_key"),
        (["--api-key", " k "], "api_key"),
        (["--max-request-body", "10"], "max_request_body"),
        (["--max-request-body", "lots"], "size"),
        (["--max-chars-per-token", "0"], "max_chars_per_token"),
        (["--tokenizer-threads", "0"], "tokenizer_threads"),
    ],
)
def test_bad_security_flags_are_one_line_errors(argv, key, capsys):
    from engine.cli import main

    assert main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engine: error:") and key in err and err.count("\n") == 1, err


def test_sampling_params_bound_the_seed_and_the_temperature():
    from engine.errors import InvalidRequestError
    from engine.sampling_params import SamplingParams

    for seed in (2**63, -(2**63) - 1, 1.5):
        with pytest.raises(InvalidRequestError, match="seed must be an integer"):
            SamplingParams(seed=seed)
    for t in (float("nan"), float("inf"), -1e-9):
        with pytest.raises(InvalidRequestError, match="temperature"):
            SamplingParams(temperature=t)
    assert SamplingParams(temperature=1e-300).temperature == 0.01
    assert SamplingParams(temperature=0).greedy and SamplingParams(seed=2**63 - 1).seed
