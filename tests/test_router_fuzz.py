"""A bounded fuzz of request bodies against a running ``kvrouter`` (issue 13).

Hundreds of mutated and garbage bodies, from a fixed seed, go to a router that tokenizes
and hashes text (prefix_aware with a tokenizer) in front of two stub upstreams. Every
answer must be either the router's own 4xx with an OpenAI error body or an answer relayed
from an upstream (``X-Kvrouter-Backend``), never a router 5xx nor a hang; afterwards the
router still routes a good request to the backend that holds its prefix.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from pathlib import Path

import aiohttp
from router_upstream import post

SEED = 20240613
N_MUTANTS = 400
KEY = "fuzz-key"
SEEDS = [
    {"model": "tiny", "prompt": "the cat sat on the mat", "max_tokens": 4},
    {"model": "tiny", "prompt": list(range(40)), "max_tokens": 2, "stream": True},
    {"prompt": ["one", "two"], "cache_salt": "tenant-a", "max_completion_tokens": 3},
    {"prompt": [[1, 2, 3], [4, 5]], "temperature": 0.5, "stop": ["\n"]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "stream": False},
    {
        "messages": [
            {"role": "system", "content": None},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    },
]
NASTY = [
    None,
    True,
    -1,
    0,
    2**64,
    10**400,
    1.5,
    "",
    "x" * 5000,
    "\ud800",
    "\udc00a",
    "\U0001f600",
    [],
    {},
    [None],
    [[[]]],
    {"": {}},
    [1, "a"],
    [-5, 2**70],
    {"text": 5},
    [{"text": None}],
    "\x00\x01",
    "NaN",
]
RAW_GARBAGE = [
    b"",
    b"null",
    b"[]",
    b"1e999999",
    b'"str"',
    b"{",
    b"}",
    b'{"prompt": NaN}',
    b'{"prompt": Infinity}',
    b"\xff\xfe{}",
    b"\xef\xbb\xbf{}",
    b'{"prompt": "\xed\xa0\x80"}',
    b"[" * 50_000,
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"a": 1, "a": 2, "prompt": "dup"}',
    b'{"prompt": "x"}' * 3,
    json.dumps({"prompt": "y" * 70_000}).encode(),  # over --max-body-bytes
    b'{"messages": [' + b'{"role": "user", "content": "m"},' * 2000 + b"{}]}",
]


def mutate_tree(rng: random.Random, body):
    """``body`` with one value replaced, one key added or one removed, somewhere."""
    body = copy.deepcopy(body)
    node = body
    for _ in range(rng.randint(0, 3)):  # walk down a little
        children = list(node.values()) if isinstance(node, dict) else node
        inner = [c for c in children if isinstance(c, (dict, list)) and c]
        if not inner:
            break
        node = rng.choice(inner)
    op = rng.random()
    if isinstance(node, dict):
        keys = list(node) or ["prompt"]
        if op < 0.6:
            node[rng.choice(keys)] = rng.choice(NASTY)
        elif op < 0.8:
            node[
                rng.choice(
                    [
                        "prompt",
                        "messages",
                        "stream",
                        "max_tokens",
                        "cache_salt",
                        "role",
                        "content",
                        "\ud800",
                        "kv_transfer_params",
                    ]
                )
            ] = rng.choice(NASTY)
        else:
            node.pop(rng.choice(keys), None)
    elif isinstance(node, list):
        if op < 0.6:
            node[rng.randrange(len(node))] = rng.choice(NASTY)
        elif op < 0.8:
            node.append(rng.choice(NASTY))
        else:
            node.clear()
    return body


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.random(), rng.randrange(len(data) + 1)
        if op < 0.4 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op < 0.7:
            data[at:at] = rng.choice(
                [
                    b"\\ud800",
                    b"\xed\xa0\x80",
                    b"\xff",
                    b"\x00",
                    b"[",
                    b"{",
                    b'"',
                    b"\\",
                    b",",
                    b"NaN",
                    b"\\u0000",
                ]
            )
        else:
            del data[at : at + rng.randint(1, 8)]
    return bytes(data)


def bodies(rng: random.Random) -> list[tuple[str, bytes]]:
    out = []
    for i in range(N_MUTANTS):
        seed = rng.choice(SEEDS)
        path = "/v1/chat/completions" if "messages" in seed else "/v1/completions"
        if rng.random() < 0.1:
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])  # the wrong shape
        if i % 3 == 0:
            raw = mutate_bytes(rng, json.dumps(seed).encode())
        else:
            raw = json.dumps(mutate_tree(rng, seed)).encode()
        out.append((path, raw))
    out += [("/v1/completions", g) for g in RAW_GARBAGE]
    out += [("/v1/chat/completions", g) for g in RAW_GARBAGE]
    rng.shuffle(out)
    return out


def is_openai_error(data: bytes) -> bool:
    try:
        err = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}


async def send_all(url: str, cases: list[tuple[str, bytes]]) -> list[str]:
    """Every case's answer checked; returns what went wrong, one line per case."""
    problems = []
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for path, raw in cases:
            try:
                async with s.post(url + path, data=raw, headers=headers) as r:
                    data = await r.read()
                    relayed = "X-Kvrouter-Backend" in r.headers
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                problems.append(f"{path} {raw[:80]!r}: no answer ({e!r})")
                continue
            if relayed:
                continue  # the upstream's own answer, whatever it is
            if not (400 <= r.status < 500 and is_openai_error(data)):
                problems.append(f"{path} {raw[:80]!r}: router answered {r.status} {data[:200]!r}")
    return problems


def test_fuzzed_bodies_never_break_the_router(ups, start_router):
    a, b = ups.start("a"), ups.start("b")
    r = start_router(
        "--backend",
        a.url,
        b.url,
        "--policy",
        "prefix_aware",
        "--tokenizer",
        "tiny",
        "--api-key",
        KEY,
        "--max-body-bytes",
        "65536",
    )
    log = Path(r.log_path)
    cases = bodies(random.Random(SEED))
    t0 = time.monotonic()
    problems = asyncio.run(send_all(r.url, cases))
    elapsed = time.monotonic() - t0
    assert not problems, "\n".join(problems[:20])
    assert elapsed < 60, f"{len(cases)} requests took {elapsed:.1f} s"
    assert r.proc.poll() is None
    assert "Traceback" not in log.read_text()  # nothing escaped a handler
    # It still routes: a prompt goes where it went before (prefix_aware, no KV events:
    # the least loaded, rotating), answered by the backend with the body intact.
    prompt = list(range(100, 164))
    status, body, headers = post(r.url + "/v1/completions", {"prompt": prompt}, token=KEY)
    assert status == 200 and body["choices"][0]["text"] == f"from {body['backend']}"
    backend = a if body["backend"] == "a" else b
    assert headers["X-Kvrouter-Backend"] == backend.url
    assert backend.requests[-1] == {"prompt": prompt}
