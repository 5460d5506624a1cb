"""A bounded fuzz of ``engine serve``'s request bodies (issue 13).

A few hundred bodies from a fixed seed, against a real ``engine serve --model tiny``:
valid requests with one field set to a value that must be refused (and other fields
set to random JSON), whole bodies of the wrong JSON type, random bytes, truncated JSON,
deep nesting, huge numbers, ``NaN``, bad UTF-8, lone surrogates, and good bodies sent
with the wrong content type. Every answer must be a 4xx with OpenAI's error body (no
5xx, no hang); afterwards the server answers a good request with the same greedy text as
before, no request is left running and no block is leaked.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest
from engine_server_proc import start_engine
from http_raw import is_error_body, post

pytest.importorskip("openai")

SEED, CASES, MAX_LEN = 20260113, 500, 256
GOOD = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
PATHS = ("/v1/completions", "/v1/chat/completions")

# Values each field must refuse. A case sets one of them, so every body is bad.
BAD_VALUES: dict[str, list[Any]] = {
    "model": [None, "", "gpt-4", 7, ["tiny"], {"id": "tiny"}, True],
    "prompt": [
        None,
        "",
        7,
        1.5,
        True,
        {},
        [],
        [[1, 2], [3]],
        [1.5],
        [True],
        [-1],
        [10**6],
        ["a", "b"],
        list(range(3, 3 + MAX_LEN)),
        "p" * (16 * MAX_LEN + 1),
    ],
    "messages": [
        None,
        "hi",
        [],
        [1],
        [{}],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
        [{"role": "user", "content": "m" * (16 * MAX_LEN + 1)}],
    ],
    "max_tokens": [0, -1, "5", 1.5, True, [], {}, 10**30, 2**63, MAX_LEN],
    "temperature": [-0.1, 2.0001, "1", [], True, 10**400],
    "top_p": [0, -1, 1.5, "x", False],
    "top_k": [-1, 1.5, "x", [3]],
    "seed": [2**64, -(2**63) - 1, 1.5, "1", 10**100, [1]],
    "stop": [[""], [1], 5, {"a": 1}, ["x"] * 17, "s" * 300, [None]],
    "stop_token_ids": ["x", [1.5], ["a"], [True], list(range(300)), 3],
    "stream": ["yes", 1, [], {}],
    "stream_options": ["x", 1, [True]],
    "cache_salt": ["", 1, [], {}, "\ud800", "a\udfffb"],
    "n": [2, 0, "1", 1.5],
    "logprobs": [True, 3],
    "echo": [True],
    "best_of": [2, "2"],
    "ignore_eos": ["yes", 1, []],
    "kv_transfer_params": ["x", 1, [], True],
}
CHAT_ONLY, COMPLETION_ONLY = {"messages"}, {"prompt", "echo", "best_of"}


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**64, -(2**70), 10 ** rng.randrange(1, 300)])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e-300, 1e300, 3.14])
    if kind in (4, 5):
        return "".join(
            rng.choice('ab \n"\\\u00e9\u4e2d\U0001f600') for _ in range(rng.randrange(6))
        )
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _random_json(rng, depth + 1) for i in range(rng.randrange(4))}


def _base(path: str) -> dict[str, Any]:
    if path.endswith("chat/completions"):
        return {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "temperature": 0,
        }
    return dict(GOOD)


def _field_case(rng: random.Random, path: str) -> bytes:
    body = _base(path)
    skip = COMPLETION_ONLY if "chat" in path else CHAT_ONLY
    fields = [f for f in BAD_VALUES if f not in skip]
    bad = rng.choice(fields)
    body[bad] = rng.choice(BAD_VALUES[bad])
    for _ in range(rng.randrange(3)):  # noise: unknown fields, or other fields made random
        name = rng.choice([f for f in fields if f != bad] + ["user", "x_extra", "suffix"])
        if name in ("user", "x_extra", "suffix") or rng.random() < 0.5:
            body[name] = _random_json(rng)
    if body.get(bad, 0) is None:
        body.pop(bad)  # None: the field left out (required ones)
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates become \\udXXX escapes


def _garbage_case(rng: random.Random, path: str) -> tuple[bytes, str | None]:
    good = json.dumps(_base(path)).encode()
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), None
    if kind == 1:
        return json.dumps(rng.choice([None, 1, "x", [1, 2], [], True, 2.5])).encode(), None
    if kind == 2:
        return good[: rng.randrange(len(good))], None  # truncated
    if kind == 3:
        depth = rng.choice([1_000, 20_000, 100_000])
        opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        return good[:-1] + b', "x": ' + opener * depth + b"1" + closer * depth + b"}", None
    if kind == 4:
        field = rng.choice([b'"max_tokens"', b'"seed"', b'"temperature"', b'"top_k"'])
        number = rng.choice(
            [
                b"9" * rng.randrange(4301, 20000),
                b"1e999999",
                b"-1e999",
                b"NaN",
                b"Infinity",
                b"-Infinity",
                b"0x10",
                b"01",
                b"1.",
            ]
        )
        return good[:-1] + b", " + field + b": " + number + b"}", None
    if kind == 5:  # invalid UTF-8 inside a string
        junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"])
        return good.replace(b"tiny", b"ti" + junk + b"ny", 1), None
    if kind == 6:  # a lone surrogate escape in the model, the prompt or a stop string
        esc = rng.choice([b"\\ud800", b"\\uDFFF", b"\\udbff", b"\\ud83d"])
        return good[:-1] + b', "stop": ["ab' + esc + b'"]}', None
    if kind == 7:
        ctype = rng.choice(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data",
                "application/xml",
                "image/png",
            ]
        )
        return good, ctype
    if kind == 8:
        return b"", None
    return good.replace(b"{", b"{" + b'"a": 1, ' * rng.randrange(1, 4), 1)[:-2], None


@pytest.fixture(scope="module")
def server():
    srv = start_engine("--model", "tiny", "--max-model-len", str(MAX_LEN))
    yield srv
    assert srv.stop() == 0


def test_fuzzed_bodies_get_4xx_and_the_server_answers_as_before(server):
    status, before = post(server.port, "/v1/completions", GOOD)
    assert status == 200, before
    rng = random.Random(SEED)
    seen: Counter[tuple[int, str]] = Counter()
    for i in range(CASES):
        path = rng.choice(PATHS)
        ctype = None
        if rng.random() < 0.6:
            body = _field_case(rng, path)
        else:
            body, ctype = _garbage_case(rng, path)
        headers = {"Content-Type": ctype} if ctype else None
        status, reply = post(server.port, path, body, headers=headers, timeout=30)
        assert 400 <= status < 500 and is_error_body(reply), (i, path, body[:300], status, reply)
        seen[(status, reply["error"]["code"])] += 1
    assert len(seen) >= 8, seen  # the cases reached many different checks
    status, after = post(server.port, "/v1/completions", GOOD)
    assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]
    assert server.get("/health")[0] == 200
    assert server.metric("engine_request_errors_total", status="500") == 0
    assert server.settled_metric("engine_requests_running", 0) == 0
    total = server.metric("engine_kv_blocks_total")
    assert server.settled_metric("engine_kv_blocks_free", total) == total
