"""The one key end to end: a real engine's KV events, published over ZMQ, index exactly the
blocks the router hashes from the same text prompt."""

from __future__ import annotations

import time

import zmq

from engine.kv_publisher import KVEventPublisher
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from router.backends import Backend
from router.kv_events import decode_batch
from router.kv_index import KVIndex
from router.policies import make_policy
from router.prompt import PromptHasher, load_tokenizer

PROMPT = "the quick brown fox jumps over the lazy dog " * 6


def test_engine_events_match_router_hashes():
    pub = KVEventPublisher("tcp://127.0.0.1:*")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    time.sleep(0.3)
    index = KVIndex()
    try:
        with LLM("tiny", enable_kv_events=True) as llm:
            llm.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0))
            pub.publish(llm.engine.take_kv_events())
            n_prompt = len(llm.tokenizer.encode(PROMPT))
        while sub.poll(1000):
            index.apply("http://e1", decode_batch(sub.recv_multipart()[2]).events)
    finally:
        pub.close()
        ctx.destroy(linger=0)
    hasher = PromptHasher(16, load_tokenizer("tiny"))
    hashes = hasher.hashes({"prompt": PROMPT}, chat=False)
    assert len(hashes) == n_prompt // 16 > 2
    policy = make_policy("prefix_aware", index, 16)
    d = policy.choose([Backend("http://e0"), Backend("http://e1")], hashes)
    assert (d.backend.url, d.hit_tokens) == ("http://e1", len(hashes) * 16)
    other = hasher.hashes({"prompt": PROMPT, "cache_salt": "tenant-b"}, chat=False)
    assert index.match(other, ["http://e1"], 16)["http://e1"].hit_tokens == 0  # salts separate
