"""Hand-off limits (issue 13, item 7): ``kv_transfer_params`` arrive over unauthenticated
HTTP, so they can neither pin a daemon's memory beyond fixed caps nor make the engine
call a host that is not on its allow-list. Real daemons, real engines, real sockets."""

from __future__ import annotations

import socket
import time

import pytest
from daemon_proc import PinCounts, chunk, start_daemon
from engine_server_proc import start_engine

from backends.remote import RemoteBackend
from connector.disagg import RemoteDecode, check_params
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from store.client import KVStoreClient
from store.config import ConfigError, StoreConfig
from store.daemon.lease import LeaseLimits, LeaseRefused, LeaseTable, payload_bytes
from store.wire.proto import kvstore_pb2 as pb
from store.wire.stream import RemoteError

CHUNK_BYTES = 256 << 10  # payload of one test chunk: 4 pages of the cpu tier
CHUNK = 32  # engine chunk size (tokens)
PROMPT = [(7 * i + 3) % 250 + 5 for i in range(5 * CHUNK + 3)]  # 5 whole chunks + 3


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon("--cpu-size", "8MiB")  # default caps: a client 2 MiB, all 4 MiB
    try:
        yield d
    finally:
        d.terminate()


@pytest.fixture
def listener():
    """A real socket nobody should connect to; ``accepted()`` says whether one did."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.3)

    def accepted() -> bool:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            return False
        conn.close()
        return True

    try:
        yield f"kvstore://127.0.0.1:{sock.getsockname()[1]}", accepted
    finally:
        sock.close()


def lease(client: KVStoreClient, keys: list[str], ttl: float) -> tuple[str, int] | str:
    """``(lease_id, count)`` of a raw Lease RPC, or the status name it failed with."""
    try:
        r = client._call("Lease", pb.LeaseRequest(keys=keys, ttl_seconds=ttl))
    except RemoteError as exc:
        return exc.code
    return r.lease_id, r.count


def release(client: KVStoreClient, lease_ids: list[str]) -> None:
    for lease_id in lease_ids:
        client._call("Release", pb.ReleaseRequest(lease_id=lease_id))


def salted(tag: str) -> list[int]:
    return [sum(map(ord, tag)) % 200 + 5, len(tag) % 200 + 5, *PROMPT[2:]]


def producer(url: str, **kv: object) -> LLMEngine:
    config = {"tiers": [url], "chunk_size": CHUNK, **kv}
    return LLMEngine(
        EngineConfig(
            model="tiny",
            kv_cache_memory="4MiB",
            max_num_seqs=4,
            kv_connector="tiered",
            kv_role="producer",
            kv_config=config,
        )
    )


def prefill(engine: LLMEngine, prompt: list[int], kv: dict) -> dict:
    req = engine.add_request(
        prompt, SamplingParams(temperature=0, max_tokens=1), kv_transfer_params=kv
    )
    while True:
        for out in engine.step():
            if out.request_id == req.request_id and out.finished:
                return engine.finish_kv_transfer(out).kv_transfer_params


# -- the daemon: caps where the pins are held --------------------------------------------
def test_leases_of_one_client_cannot_pin_more_than_a_quarter_of_the_tier(daemon):
    """The attack: lease every chunk one puts, for as long as allowed. Only a quarter of
    the 8 MiB cpu tier (8 chunks) gets pinned; the rest stays evictable, so later puts
    still land, and a refused lease is no outage (the client does not back off)."""
    client = KVStoreClient(daemon.url)  # named host:pid, as the backend below
    backend = RemoteBackend(daemon.url)
    granted: list[str] = []
    try:
        for i in range(40):
            c = chunk(i, CHUNK_BYTES, tag="pin")
            assert client.put([c]) == [True]
            got = lease(client, [c.key], 60)
            if isinstance(got, tuple) and got[1]:
                granted.append(got[0])
            else:
                assert got == "RESOURCE_EXHAUSTED"
        assert len(granted) == 8
        fresh = [chunk(i, CHUNK_BYTES, tag="fresh") for i in range(20)]
        for i in range(0, 20, 4):
            assert client.put(fresh[i : i + 4]) == [True] * 4  # evicts what is not leased
        assert backend.lease([fresh[0].key], 30)[1] == 0  # refused: no back-off either
        assert backend.available() and backend.contains([fresh[-1].key]) == 1
    finally:
        release(client, granted)
        client.close()
        backend.close()


def test_with_tokens_a_client_is_its_token_not_the_name_it_sends(tmp_path):
    """Behind tokens, renaming oneself (``x-kvstore-client``, the stream hello) buys no
    more lease quota: the per-client cap counts by token."""
    token = tmp_path / "token"
    token.write_text("lease-token")
    d = start_daemon("--cpu-size", "8MiB", "--auth-token-file", str(token))
    clients = [KVStoreClient(d.url, "lease-token", client_name=f"alias-{n}") for n in range(4)]
    granted: list[tuple[KVStoreClient, str]] = []
    try:
        for n, client in enumerate(clients):
            for i in range(4):
                c = chunk(i, CHUNK_BYTES, tag=f"alias-{n}")
                assert client.put([c]) == [True]
                got = lease(client, [c.key], 60)
                if isinstance(got, tuple) and got[1]:
                    granted.append((client, got[0]))
        assert len(granted) == 8  # a quarter of the tier, as for one client
    finally:
        for client, lease_id in granted:
            release(client, [lease_id])
        for client in clients:
            client.close()
        assert d.terminate() == 0


def test_leases_of_all_clients_cannot_pin_more_than_half_the_tier(daemon):
    clients = [KVStoreClient(daemon.url, client_name=f"client-{n}") for n in range(3)]
    held: list[tuple[KVStoreClient, str]] = []
    try:
        counts = []
        for n, client in enumerate(clients):
            keys = [chunk(i, CHUNK_BYTES, tag=f"all-{n}") for i in range(8)]
            assert client.put(keys) == [True] * 8
            ok = 0
            for c in keys:
                got = lease(client, [c.key], 60)
                if isinstance(got, tuple) and got[1]:
                    held.append((client, got[0]))
                    ok += 1
            counts.append(ok)
        assert counts == [8, 8, 0]  # 4 MiB pinned in all: the third client gets nothing
    finally:
        for client, lease_id in held:
            release(client, [lease_id])
        for client in clients:
            client.close()


def test_a_lease_longer_than_the_daemon_allows_is_invalid_argument(daemon):
    client = KVStoreClient(daemon.url, client_name="long")
    try:
        c = chunk(0, 4096, tag="long")
        client.put([c])
        assert lease(client, [c.key], 600) == "INVALID_ARGUMENT"
        with pytest.raises(RemoteError, match="max_lease_ttl"):
            client._call("Lease", pb.LeaseRequest(keys=[c.key], ttl_seconds=61))
        lease_id, n = lease(client, [c.key], 60)
        assert n == 1
        release(client, [lease_id])
    finally:
        client.close()


def test_a_daemon_refusal_leaves_the_prefill_answer_without_a_hand_off():
    """The daemon's cap hit: the prefill leg still answers (no hand-off, the decode node
    recomputes) and the producer's store tier stays in use."""
    strict = start_daemon("--cpu-size", "8MiB", "--set", "max_leases_per_client=1")
    engine = producer(strict.url)
    try:
        first = prefill(engine, salted("refusal-1"), {"do_remote_decode": True})
        second = prefill(engine, salted("refusal-2"), {"do_remote_decode": True})
        assert first["num_tokens"] == 5 * CHUNK and first["lease_id"]
        assert second["num_tokens"] == 0 and second["lease_id"] is None
        assert second["remote_store"] == strict.url
        assert engine.connector.store.tiers[0].backend.available()  # not treated as down
    finally:
        engine.close()
        strict.terminate()


def test_lease_table_caps_and_accounting_return_to_zero():
    """Refused leases pin nothing; released and expired leases give their share back."""
    pins = PinCounts()

    limits = LeaseLimits(max_ttl=10, per_client=2, client_bytes=100, total_bytes=150)
    table = LeaseTable(pins.pin, pins.unpin, tick=0.02, limits=limits)
    size = lambda keys: 40 * len(keys)  # noqa: E731
    try:
        a = table.lease(["k1"], 10, lambda: 1, "a", size)[0]
        table.lease(["k2"], 0.05, lambda: 1, "a", size)
        with pytest.raises(LeaseRefused, match="max_leases_per_client"):
            table.lease(["k3"], 10, lambda: 1, "a", size)
        with pytest.raises(LeaseRefused, match="max_lease_bytes_per_client"):
            table.lease(["k4", "k5", "k6"], 10, lambda: 3, "b", size)
        table.lease(["k4"], 10, lambda: 1, "b", size)
        with pytest.raises(LeaseRefused, match="max_lease_bytes 150"):
            table.lease(["k5"], 10, lambda: 1, "c", size)  # 120 leased + 40 > 150
        with pytest.raises(ValueError, match="max_lease_ttl"):
            table.lease(["k1"], 11, lambda: 1, "c", size)
        assert pins == {"k1": 1, "k2": 1, "k3": 0, "k4": 1, "k5": 0, "k6": 0}
        assert table.held_by("a") == (2, 80)
        deadline = time.monotonic() + 10
        while table.held_by("a") != (1, 40):  # k2 expired
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert table.release(a) and table.held_by("a") == (0, 0) and pins["k1"] == 0
        assert table.lease(["k5"], 10, lambda: 1, "c", size)[1] == 1  # room again
    finally:
        table.close()
    assert set(pins.values()) == {0} and table.held_by("b") == (0, 0)


def test_payload_bytes_fills_unknown_sizes_with_the_largest_known():
    assert payload_bytes({"a": 10, "b": 30}.get, ["a", "b", "c"]) == 70
    assert payload_bytes({}.get, ["a", "b"]) == 0


# -- the engine: what a request may ask for --------------------------------------------
def test_the_engine_caps_lease_ttl_and_outstanding_leases(daemon):
    engine = producer(daemon.url, max_lease_ttl=10, max_outstanding_leases=2)
    backend = RemoteBackend(daemon.url)
    try:
        with pytest.raises(InvalidRequestError, match=r"lease_ttl.*\(0, 10\].*max_lease_ttl"):
            engine.add_request(
                PROMPT, kv_transfer_params={"do_remote_decode": True, "lease_ttl": 600}
            )
        assert not engine.requests
        handles = [
            prefill(engine, salted(f"cap-{i}"), {"do_remote_decode": True}) for i in range(3)
        ]
        assert [h["num_tokens"] for h in handles] == [5 * CHUNK, 5 * CHUNK, 0]
        assert handles[0]["lease_expires"] <= time.time() + 10.5  # the default ttl, capped
        assert backend.available()
    finally:
        for h in handles if "handles" in locals() else ():
            if h["lease_id"]:
                backend.release(h["lease_id"])
        backend.close()
        engine.close()


def test_remote_store_off_the_allow_list_is_refused_and_never_contacted(daemon, listener):
    url, accepted = listener
    engine = producer(daemon.url)
    try:
        for kv in (
            {"do_remote_decode": True, "remote_store": url},
            {"do_remote_decode": True, "remote_store": "kvstore://10.1.2.3:50051"},
        ):
            with pytest.raises(InvalidRequestError, match=r"remote_store.*allowed_remote_stores"):
                engine.add_request(PROMPT, kv_transfer_params=kv)
        # A handle that got past the check anyway (a forged call) still reaches no one.
        agent = engine.connector.transfers
        out = agent.finish(RemoteDecode("forged", ["ab" * 32], url, 30.0, 2.0))
        assert out["num_tokens"] == 0 and out["lease_id"] is None
        assert not accepted()
        # The engine's own store is allowed, however the url is spelt.
        spelt = daemon.url + "/"
        assert check_params({"remote_store": spelt}, agent.policy) is None
    finally:
        engine.close()


def test_remote_store_on_the_allow_list_gets_the_hand_off(daemon):
    other = start_daemon("--cpu-size", "8MiB")
    engine = producer(daemon.url, allowed_remote_stores=[other.url])
    backend = RemoteBackend(other.url)
    try:
        params = prefill(
            engine, salted("other"), {"do_remote_decode": True, "remote_store": other.url}
        )
        assert params["remote_store"] == other.url and params["num_tokens"] == 5 * CHUNK
        assert backend.active_leases() == 1 and backend.contains(params["keys"]) == 5
    finally:
        backend.close()
        engine.close()
        other.terminate()


def test_hand_off_config_keys_are_checked():
    c = StoreConfig.load(
        env={
            "KVSTORE_ALLOWED_REMOTE_STORES": "kvstore://a:1,kvstore://b:2",
            "KVSTORE_MAX_LEASE_BYTES_PER_CLIENT": "1GiB",
        }
    )
    assert c.allowed_remote_stores == ["kvstore://a:1", "kvstore://b:2"]
    assert c.max_lease_bytes_per_client == 1 << 30 and c.max_lease_ttl == 60
    for bad, why in (
        ({"max_lease_ttl": 0}, "max_lease_ttl"),
        ({"max_lease_ttl": 601}, "max_lease_ttl"),
        ({"max_leases_per_client": 0}, "max_leases_per_client"),
        ({"max_outstanding_leases": -1}, "max_outstanding_leases"),
        ({"max_lease_bytes": "lots"}, "max_lease_bytes"),
        ({"allowed_remote_stores": ["http://x:1"]}, "allowed_remote_stores"),
    ):
        with pytest.raises(ConfigError, match=why):
            StoreConfig.load(overrides=bad)


# -- over HTTP: the 400s, before anything runs or connects -------------------------------
def test_http_refuses_off_list_stores_and_long_leases_with_400(daemon, listener):
    url, accepted = listener
    server = start_engine("--model", "tiny", "--kvstore", daemon.url, "--kv-role", "producer")
    try:
        body = {"model": "tiny", "prompt": "hello " * 60, "max_tokens": 1}
        for kv, stream, names in (
            ({"do_remote_decode": True, "remote_store": url}, False, "allowed_remote_stores"),
            ({"do_remote_decode": True, "remote_store": url}, True, "allowed_remote_stores"),
            ({"do_remote_decode": True, "lease_ttl": 600}, True, "max_lease_ttl"),
        ):
            status, got = server.post(
                "/v1/completions", {**body, "stream": stream, "kv_transfer_params": kv}
            )
            assert status == 400, got
            assert got["error"]["param"] == "kv_transfer_params"
            assert got["error"]["type"] == "invalid_request_error"
            assert names in got["error"]["message"]
        assert not accepted()
        kv = {"do_remote_decode": True, "remote_store": daemon.url, "lease_ttl": 5}
        status, got = server.post("/v1/completions", {**body, "kv_transfer_params": kv})
        assert status == 200 and got["kv_transfer_params"]["remote_store"] == daemon.url
    finally:
        server.stop()
