"""Who may do what at the daemon (store/daemon/auth.py), against real daemon processes:
read-only tokens, tokens bound to a cache salt, loopback-only without a token."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest
from daemon_proc import FP, chunk, key, same, start_daemon

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kvcore.chunk import make_chunk
from kvcore.keys import chunk_key, key_salt_tag, salt_tag
from store.cli import main
from store.client import KVStoreClient
from store.daemon.auth import Authenticator, Grant, TokenEntry, is_loopback
from store.wire.proto import kvstore_pb2 as pb
from store.wire.stream import RemoteError

TRANSPORTS = ["grpc", "stream", "shm"]
ADMIN, READER, A_WRITE, A_READ, B_WRITE = "admin-t0ken", "reader-t0ken", "a-w", "a-r", "b-w"
SALT_A, SALT_B = "tenant-a-salt", "tenant-b-salt"
CHUNK = 32  # tokens per stored chunk in the engine test


def salted(i: int, salt: str, tag: str = "") -> object:
    """A chunk whose key carries ``salt``'s tag, as an engine's salted request makes."""
    kv = np.random.default_rng(i).integers(0, 256, 4096, dtype=np.uint8).reshape(1, 2, -1, 1, 1)
    return make_chunk(f"{salt_tag(salt)}.{key(i, tag)}", FP, kv, kv.shape[2], dtype="uint8")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon with a full token (--auth-token-file) and a table of scoped ones."""
    d = tmp_path_factory.mktemp("auth")
    (d / "admin").write_text(ADMIN + "\n")
    (d / "a-write").write_text(A_WRITE)
    (d / "tokens.yaml").write_text(
        f"tokens:\n"
        f"  - {{token: {READER}, scope: read}}\n"
        f"  - {{token_file: a-write, cache_salt: {SALT_A}}}\n"  # relative to the YAML
        f"  - {{token: {A_READ}, scope: read, cache_salt: {SALT_A}}}\n"
        f"  - {{token: {B_WRITE}, scope: write, cache_salt: {SALT_B}}}\n"
    )
    proc = start_daemon(
        "--cpu-size",
        "32MiB",
        "--auth-token-file",
        str(d / "admin"),
        "--auth-tokens",
        str(d / "tokens.yaml"),
    )
    yield proc
    assert proc.terminate() == 0


def client(d, token: str, transport: str = "auto") -> KVStoreClient:
    return KVStoreClient(d.url, token=token, transport=transport, timeout=10)


def denied(call) -> str:
    with pytest.raises(RemoteError) as exc:
        call()
    assert exc.value.code == "PERMISSION_DENIED", exc.value
    return exc.value.message


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_read_token_cannot_put_but_can_get(daemon, transport):
    c = chunk(1, tag=f"ro-{transport}")
    with client(daemon, READER, transport) as reader, client(daemon, ADMIN) as admin:
        assert "read-only" in denied(lambda: reader.put([c], transport=transport))
        assert admin.lookup([c.key]) == []  # nothing stored
        assert admin.put([c]) == [True]
        # the same client (its connection kept in step after the refusal) reads it
        assert same(reader.get([c.key], transport=transport)[0], c)
        assert reader.lookup([c.key]) == ["cpu"]
        denied(lambda: reader.delete([c.key]))
        denied(lambda: reader._call("Lease", pb.LeaseRequest(keys=[c.key], ttl_seconds=5)))
        assert admin.lookup([c.key]) == ["cpu"]
        # a decode node with a read token ends the lease its prefill node took
        lease = admin._call("Lease", pb.LeaseRequest(keys=[c.key], ttl_seconds=5))
        assert reader._call("Release", pb.ReleaseRequest(lease_id=lease.lease_id)).released


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_salt_bound_token_writes_only_under_its_salt(daemon, transport):
    mine, theirs, plain = (
        salted(2, SALT_A, transport),
        salted(2, SALT_B, transport),
        chunk(2, tag=f"plain-{transport}"),
    )
    with client(daemon, A_WRITE, transport) as a, client(daemon, ADMIN) as admin:
        for bad in (theirs, plain):  # another tenant's key, an unsalted key: nothing stored
            message = denied(lambda bad=bad: a.put([mine, bad], transport=transport))
            assert salt_tag(SALT_A) in message
            assert admin.lookup([mine.key]) == [] and admin.lookup([bad.key]) == []
        assert a.put([mine], transport=transport) == [True]
        assert admin.lookup([mine.key]) == ["cpu"]
        assert admin.put([theirs]) == [True]
        denied(lambda: a.delete([theirs.key]))
        denied(lambda: a._call("Lease", pb.LeaseRequest(keys=[theirs.key], ttl_seconds=5)))
        assert admin.lookup([theirs.key]) == ["cpu"]
        assert a.delete([mine.key]) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_salt_bound_token_sees_only_its_salt(daemon, transport):
    a1, a2, b1 = salted(3, SALT_A, transport), salted(4, SALT_A, transport), salted(3, SALT_B)
    plain = chunk(3, tag=f"seen-{transport}")
    with client(daemon, A_READ, transport) as a, client(daemon, ADMIN) as admin:
        assert admin.put([a1, a2, b1, plain]) == [True] * 4
        # another tenant's cached key, and an unsalted one, look absent
        assert a.lookup([b1.key]) == [] and a.lookup([plain.key]) == []
        assert a.lookup([a1.key, b1.key, a2.key]) == ["cpu"]  # the prefix stops there
        got = a.get([b1.key, a1.key, plain.key, a2.key], transport=transport)
        assert got[0] is None and got[2] is None
        assert same(got[1], a1) and same(got[3], a2)  # at their places in the request
        assert "cache salt" in denied(a.stats)  # daemon-wide figures: not for a tenant
        assert "read-only" in denied(lambda: a.put([salted(5, SALT_A)], transport=transport))
        assert admin.lookup([b1.key, plain.key]) == ["cpu", "cpu"]  # hidden, not gone


def test_a_salt_bound_token_is_never_handed_the_shared_pool(daemon):
    """Through the same-host door a client maps the whole pool, every tenant's chunks."""
    mine = salted(6, SALT_A)
    with client(daemon, A_READ, "shm") as a, client(daemon, ADMIN, "shm") as admin:
        assert admin.put([mine]) == [True]
        assert same(admin.get([mine.key])[0], mine) and same(a.get([mine.key])[0], mine)
        assert admin._idle[0].pool is not None  # the admin's connection maps the pool
        assert a._idle[0].region is not None and a._idle[0].pool is None


def test_the_engine_reads_and_writes_through_salt_bound_tokens(daemon, tmp_path):
    """A producer engine writes tenant A's prompt through A's write token; a fresh
    engine with A's read token loads it from the daemon (the same greedy tokens); one
    with B's token gets no hit, and its saves under A's salt are refused (stored: none),
    yet it answers the same."""
    prompt = list(range(10, 10 + 4 * CHUNK + 3))
    params = SamplingParams(temperature=0, max_tokens=2)

    def engine(token: str) -> LLMEngine:
        path = tmp_path / f"token-{token}"
        path.write_text(token)
        kv = {"tiers": [daemon.url], "remote.token_file": str(path), "chunk_size": CHUNK}
        return LLMEngine(
            EngineConfig(
                model="tiny",
                kv_cache_memory="4MiB",
                enable_prefix_caching=False,
                kv_connector="tiered",
                kv_config=kv,
            )
        )

    def run(e: LLMEngine):
        req = e.add_request(prompt, params, cache_salt=SALT_A)
        while True:
            for out in e.step():
                if out.request_id == req.request_id and out.finished:
                    return out

    def items() -> int:
        with client(daemon, ADMIN) as admin:
            return admin.stats().tiers[0].items

    def refused_puts() -> float:
        url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        found = re.search(
            r'request_errors_total\{code="PERMISSION_DENIED",method="Put"\} (\S+)', text
        )
        return float(found.group(1)) if found else 0.0

    base, refused, outs = items(), refused_puts(), {}
    for token in (A_WRITE, A_READ, B_WRITE):
        e = engine(token)
        try:
            outs[token] = run(e)
            deadline = time.monotonic() + 20
            while token == A_WRITE and items() < base + 4:  # the producer's 4 chunks
                assert time.monotonic() < deadline, "the producer's saves never landed"
                time.sleep(0.05)
        finally:
            e.close()  # waits for its saves
    assert items() == base + 4  # nothing from the reader, nothing from tenant B
    assert refused_puts() > refused  # tenant B's engine tried, and was refused
    assert outs[A_READ].token_ids == outs[B_WRITE].token_ids == outs[A_WRITE].token_ids
    assert outs[A_WRITE].metrics.kv_sources.get("remote", 0) == 0
    assert outs[A_READ].metrics.kv_sources.get("remote", 0) == 4 * CHUNK
    assert outs[B_WRITE].metrics.kv_sources.get("remote", 0) == 0  # tenant B sees nothing


def test_listening_beyond_loopback_needs_a_token_or_insecure(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "off"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--insecure" in err and "--auth-token-file" in err and err.count("\n") == 1
    d = start_daemon("--host", "0.0.0.0", "--insecure", "--cpu-size", "16MiB")
    try:
        with KVStoreClient(d.url, timeout=10) as c:
            assert c.put([chunk(7, tag="insecure")]) == [True]
    finally:
        assert d.terminate() == 0
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("node1")


@pytest.mark.parametrize(
    "body,message",
    [
        ("tokens:\n  - {token: x, scope: admin}\n", "tokens[0].scope: 'admin' is not one of"),
        ("tokens:\n  - {token: x, token_file: f}\n", "exactly one of token, token_file"),
        ("tokens:\n  - {token_file: missing}\n", "tokens[0].token_file: No such file"),
        ("tokens:\n  - {token: x}\n  - {token: x, scope: read}\n", "listed twice"),
        ("tokens:\n  - {token: x, salt: s}\n", "unknown key 'salt'"),
        ("tokens:\n  - {token: x, cache_salt: ''}\n", "tokens[0].cache_salt: must be"),
        ("tokens: []\n", "at least one entry"),
    ],
)
def test_a_bad_token_table_is_one_line_and_exit_2(body, message, tmp_path, capsys):
    path = tmp_path / "tokens.yaml"
    path.write_text(body)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "0", "--metrics-port", "off", "--auth-tokens", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_tokens_resolve_to_their_grants():
    auth = Authenticator(
        [TokenEntry("w"), TokenEntry("r", "read"), TokenEntry("t", "write", SALT_A)]
    )

    def rights(grant):
        return None if grant is None else (grant.scope, grant.salt_tag)

    assert rights(auth.grant("w")) == ("write", None) and rights(auth.grant(b"r")) == ("read", None)
    assert rights(auth.grant("t")) == ("write", salt_tag(SALT_A))
    assert auth.grant("nope") is None and auth.grant(None) is None and auth.grant("") is None
    assert rights(auth.grant_of_metadata([("authorization", "Bearer r")])) == ("read", None)
    holders = {auth.grant(t).holder for t in ("w", "r", "t")}  # each token is one client
    assert len(holders) == 3 and all(h and h.startswith("token-") for h in holders)
    assert auth.grant_of_metadata([("authorization", "r")]) is None
    assert Authenticator().grant(None) == Grant("write", None)  # no tokens: open
    # a salted key is "<tag>.<64 hex>"; the tag is the salt's, the rest the plain key
    plain, tagged = chunk_key(b"fp", b"h"), chunk_key(b"fp", b"h", cache_salt=SALT_A)
    assert tagged == f"{salt_tag(SALT_A)}.{plain}" and key_salt_tag(plain) is None
    assert len(salt_tag(SALT_A)) == 16 and salt_tag(SALT_A) != salt_tag(SALT_B)
