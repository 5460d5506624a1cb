"""Publish the engine's KV events over ZMQ, msgpack-encoded in vLLM's ``KVEventBatch`` shape.

A router (``kvrouter --policy prefix_aware``) subscribes to learn which blocks each engine
holds. The wire follows vLLM's ``ZmqEventPublisher`` (``vllm/distributed/kv_events.py``) so
one subscriber follows vLLM and this engine alike:

* PUB socket, three frames per message: ``topic``, ``seq`` (8-byte big-endian, from 0,
  +1 per batch), ``payload``.
* ``payload = msgpack([ts, [event, ...], data_parallel_rank])``; each event a tagged array
  with trailing defaults omitted::

      ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
       medium, lora_name(, extra_keys)]
      ["BlockRemoved", block_hashes, medium]
      ["AllBlocksCleared"]

* optional ROUTER replay socket: a client (DEALER) sends ``[b"", start_seq]``; every
  buffered batch with ``seq >= start_seq`` comes back as ``[b"", seq, payload]``, then
  ``[b"", seq=-1, b""]`` ends the reply.

ZMQ sockets are not thread-safe, so one thread owns both; ``publish`` only queues.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import msgpack
import zmq

from kvcore.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

END_SEQ = (-1).to_bytes(8, "big", signed=True)
DEFAULT_TOPIC = "kv-events"


def encode_event(ev: KVCacheEvent) -> list:
    """One event as vLLM's tagged array (``array_like=True, omit_defaults=True``)."""
    if isinstance(ev, BlockStored):
        out = [
            "BlockStored",
            list(ev.block_hashes),
            ev.parent_block_hash,
            list(ev.token_ids),
            ev.block_size,
            ev.lora_id,
            ev.medium,
            ev.lora_name,
        ]
        if ev.extra_keys is not None:
            out.append([list(k) if k is not None else None for k in ev.extra_keys])
        return out
    if isinstance(ev, BlockRemoved):
        return ["BlockRemoved", list(ev.block_hashes), ev.medium]
    if isinstance(ev, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV cache event: {type(ev).__name__}")


def encode_batch(events: Sequence[KVCacheEvent], ts: float, dp_rank: int = 0) -> bytes:
    """The msgpack payload of one ``KVEventBatch``: ``[ts, [events], data_parallel_rank]``."""
    return msgpack.packb([ts, [encode_event(e) for e in events], dp_rank], use_bin_type=True)


class KVEventPublisher:
    """PUB (and optional replay ROUTER) sockets fed from a queue by one background thread.

    ``endpoint``/``replay_endpoint`` with ``*`` (``tcp://*:5557``), ``ipc://`` or
    ``inproc://`` are bound, others connected, as in vLLM. Call ``publish`` once per engine
    step with ``engine.take_kv_events()``; empty lists are skipped.
    """

    def __init__(
        self,
        endpoint: str = "tcp://*:5557",
        replay_endpoint: str | None = None,
        topic: str = DEFAULT_TOPIC,
        dp_rank: int = 0,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
    ) -> None:
        self.topic = topic.encode()
        self.dp_rank = dp_rank
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        _bind_or_connect(self._pub, endpoint)
        self._replay = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.bind(replay_endpoint)
        self.endpoint = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="kv-publisher", daemon=True)
        self._thread.start()

    def publish(self, events: Sequence[KVCacheEvent]) -> None:
        """Queue one batch (encoded now, so the caller's objects are not shared)."""
        if events:
            self._queue.put(encode_batch(events, time.time(), self.dp_rank))

    def close(self, timeout: float = 1.0) -> None:
        """Send what is queued (up to ``timeout``), then close the sockets. Idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self._ctx.destroy(linger=0)

    def _run(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                payload = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if payload is None:
                return
            seq = self._seq
            self._seq += 1
            self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
            self._buffer.append((seq, payload))

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            return  # not [identity, b"", start_seq]: ignore
        ident, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((ident, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((ident, b"", END_SEQ, b""))


def _bind_or_connect(sock: zmq.Socket, endpoint: str) -> None:
    if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
