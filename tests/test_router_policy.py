"""Router policies and the KV index, fed with real msgpack bytes through real ZMQ sockets."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import zmq
import zmq.asyncio

from engine.kv_publisher import KVEventPublisher, encode_batch
from kvcore.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvcore.keys import block_hashes
from router.backends import Backend
from router.kv_events import decode_batch
from router.kv_index import KVIndex
from router.kv_subscriber import KVEventSubscriber, parse_endpoint
from router.metrics import RouterMetrics
from router.policies import LeastLoad, PrefixAware, RoundRobin, make_policy

BS = 4
TOKENS = list(range(100, 132))  # 8 blocks of 4
H = block_hashes(TOKENS, BS)


def stored(n: int, medium: str = "GPU", first: int = 0) -> BlockStored:
    parent = H[first - 1] if first else None
    return BlockStored(H[first:n], parent, TOKENS[first * BS : n * BS], BS, medium=medium)


def recv(sock: zmq.Socket, timeout_ms: int = 3000) -> list[bytes]:
    assert sock.poll(timeout_ms), "no message"
    return sock.recv_multipart()


@pytest.fixture
def publisher():
    pub = KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", topic="kv@a")
    yield pub
    pub.close()


def subscribe(endpoint: str, topic: bytes = b"") -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    time.sleep(0.3)  # ZMQ drops what is published before the subscription arrives
    return ctx, sub


def test_publisher_frames_are_vllm_shaped(publisher):
    ctx, sub = subscribe(publisher.endpoint)
    try:
        publisher.publish([stored(2), BlockRemoved([H[0]]), AllBlocksCleared()])
        publisher.publish([])  # empty batches are not sent
        publisher.publish([stored(1, "CPU")])
        topic, seq, payload = recv(sub)
        assert topic == b"kv@a" and int.from_bytes(seq, "big") == 0
        ts, events, rank = msgpack.unpackb(payload)
        assert rank == 0 and abs(ts - time.time()) < 10
        assert events == [
            ["BlockStored", H[:2], None, TOKENS[:8], BS, None, "GPU", None],
            ["BlockRemoved", [H[0]], "GPU"],
            ["AllBlocksCleared"],
        ]
        assert int.from_bytes(recv(sub)[1], "big") == 1
    finally:
        ctx.destroy(linger=0)


def test_index_follows_events_from_the_socket(publisher):
    ctx, sub = subscribe(publisher.endpoint)
    index = KVIndex()
    try:
        publisher.publish([stored(3), stored(5, "CPU", first=3)])
        publisher.publish([BlockRemoved([H[4]], "CPU")])
        for _ in range(2):
            index.apply("a", decode_batch(recv(sub)[2]).events)
    finally:
        ctx.destroy(linger=0)
    m = index.match(H, ["a", "b"], BS)
    assert m["a"].hit_tokens == 16 and m["a"].weighted_tokens == pytest.approx(12 + 4 * 0.8)
    assert m["b"].hit_tokens == 0
    assert index.num_blocks("a") == 4 and index.block_sizes["a"] == BS


def test_decoder_reads_vllm_map_encoding():
    batch = {
        "ts": 1.5,
        "data_parallel_rank": 2,
        "events": [
            {
                "type": "BlockStored",
                "block_hashes": H[:1],
                "parent_block_hash": None,
                "token_ids": TOKENS[:4],
                "block_size": 4,
                "lora_id": None,
                "medium": "GPU",
            },
            {"type": "SomethingNew", "x": 1},
            {"type": "AllBlocksCleared"},
        ],
    }
    out = decode_batch(msgpack.packb(batch, use_bin_type=True))
    assert out.ts == 1.5 and out.dp_rank == 2
    assert out.events == [BlockStored(H[:1], None, TOKENS[:4], 4, None, "GPU"), AllBlocksCleared()]


def test_subscriber_replays_a_gap_and_forgets_on_restart(publisher):
    publisher.publish([stored(2)])  # seq 0, sent before anyone listens: lost on PUB
    publisher.publish([stored(4, first=2)])  # seq 1
    time.sleep(0.2)
    index, metrics = KVIndex(), RouterMetrics()

    async def go():
        ctx = zmq.asyncio.Context()
        inst, pub, replay = parse_endpoint(
            f"{publisher.endpoint},{publisher._replay.getsockopt(zmq.LAST_ENDPOINT).decode()}", "a"
        )
        sub = KVEventSubscriber(ctx, inst, pub, replay, index, metrics)
        await sub.on_message(2, encode_batch([stored(6, first=4)], 0.0))  # gap 0..1 replayed
        seen = index.match(H, ["a"], BS).get("a").hit_tokens
        await sub.on_message(0, encode_batch([stored(1)], 0.0))  # seq went back: restarted
        ctx.destroy(linger=0)
        return seen

    assert asyncio.run(go()) == 24
    assert index.match(H, ["a"], BS)["a"].hit_tokens == 4
    assert metrics.kv_gaps.labels("a")._value.get() == 1


def test_parse_endpoint():
    assert parse_endpoint("tcp://h:1", "http://a") == ("http://a", "tcp://h:1", None)
    assert parse_endpoint("http://b=tcp://h:1,tcp://h:2", None) == (
        "http://b",
        "tcp://h:1",
        "tcp://h:2",
    )
    with pytest.raises(ValueError):
        parse_endpoint("tcp://h:1", None)


def backends(*loads: int) -> list[Backend]:
    return [Backend(f"http://{n}", in_flight=load) for n, load in zip("abcd", loads, strict=False)]


def test_round_robin_and_least_load():
    bs = backends(0, 0, 0)
    rr = RoundRobin()
    assert [rr.choose(bs).backend.url[-1] for _ in range(4)] == list("abca")
    bs = backends(3, 1, 1)
    ll = LeastLoad()
    assert [ll.choose(bs).backend.url[-1] for _ in range(4)] == list(
        "bbcb"
    )  # ties rotate with the turn counter


def prefix_policy(index: KVIndex, **kw) -> PrefixAware:
    return make_policy("prefix_aware", index, BS, **kw)


def test_prefix_aware_picks_the_longest_prefix():
    index = KVIndex()
    index.apply("http://a", [stored(2)])
    index.apply("http://b", [stored(5)])
    index.apply("http://c", [stored(8)])
    index.apply("http://c", [BlockRemoved([H[3]])])  # c holds 0-2 and 4-7: prefix of 3
    d = prefix_policy(index).choose(backends(0, 0, 0), H)
    assert (d.backend.url, d.hit_tokens) == ("http://b", 20)
    cold = prefix_policy(index).choose(backends(2, 0, 1), block_hashes(list(range(32)), BS))
    assert (cold.backend.url, cold.hit_tokens) == ("http://b", 0)  # no hit: least loaded


def test_prefix_aware_weights_tiers():
    index = KVIndex()
    index.apply("http://a", [stored(4, "DISK")])  # 16 tokens * 0.5 = 8
    index.apply("http://b", [stored(3, "CPU")])  # 12 * 0.8 = 9.6
    index.apply("http://c", [stored(2)])  # 8 * 1.0 = 8
    assert prefix_policy(index, alpha=0).choose(backends(0, 0, 0), H).backend.url == "http://b"
    index.apply("http://a", [stored(4, "GPU")])  # also in the engine's cache: 16
    d = prefix_policy(index, alpha=0).choose(backends(0, 0, 0), H)
    assert (d.backend.url, d.hit_tokens) == ("http://a", 16)


def test_prefix_aware_balances_load_with_a_cap():
    index = KVIndex()
    index.apply("http://a", [stored(8)])  # 32 tokens on a only
    p = prefix_policy(index, alpha=4.0, load_cap=2)
    assert p.choose(backends(2, 0), H).backend.url == "http://a"  # 32 - 8 > 0
    assert p.choose(backends(2, 0), H).hit_tokens == 32
    assert p.choose(backends(3, 0), H).backend.url == "http://b"  # over the cap
    assert (
        prefix_policy(index, alpha=12.0, load_cap=9).choose(backends(3, 0), H).backend.url
        == "http://b"
    )  # 32 - 36 < 0
    # a hot prefix: simulated arrivals never pile more than cap+1 above the coolest
    bs = backends(0, 0)
    for _ in range(20):
        p.choose(bs, H).backend.in_flight += 1
    assert abs(bs[0].in_flight - bs[1].in_flight) <= 3 and bs[0].in_flight > bs[1].in_flight


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random")


def test_load_scraped_from_engine_and_vllm_metrics():
    from router.health import parse_load

    engine = "# HELP x\nengine_requests_running 2.0\nengine_requests_waiting 3.0\nengine_kv_blocks_free 9.0\n"
    vllm = 'vllm:num_requests_running{model_name="m"} 1.0\nvllm:num_requests_waiting{model_name="m"} 4.0\n'
    assert parse_load(engine) == 5 and parse_load(vllm) == 5 and parse_load("up 1\n") is None


def test_chat_hashes_follow_the_plain_template():
    from router.prompt import PromptHasher, render_chat

    msgs = [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    assert render_chat(msgs) == "system: be terse\nuser: hi\nassistant:"

    class Bytes:  # a stand-in tokenizer: one id per byte
        def encode(self, text: str) -> list[int]:
            return list(text.encode())

    h = PromptHasher(4, Bytes())
    assert h.token_ids({"messages": msgs}, chat=True) == list(render_chat(msgs).encode())
    assert h.token_ids({"prompt": [[5, 6], [7]]}, chat=False) == [5, 6]
    assert PromptHasher(4).hashes({"prompt": "text without a tokenizer"}, chat=False) == []
