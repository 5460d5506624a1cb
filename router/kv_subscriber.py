"""Follow one instance's KV event stream (ZMQ SUB) into the router's ``KVIndex``.

Frames are ``topic, seq (8-byte big-endian), payload`` as vLLM publishes them. A gap in
``seq`` (including a first message past 0: ZMQ drops what is sent before a subscriber
joins) is filled from the publisher's replay socket when one is given; a ``seq`` that goes
back means the publisher restarted, and what the instance held is forgotten.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from router.kv_events import BadEventBatch, decode_batch
from router.kv_index import KVIndex
from router.metrics import RouterMetrics

log = logging.getLogger("kvrouter")
END_SEQ = -1
REPLAY_TIMEOUT_MS = 1000


def parse_endpoint(spec: str, default_instance: str | None) -> tuple[str, str, str | None]:
    """``[URL=]PUB[,REPLAY]`` -> (instance, pub endpoint, replay endpoint or None)."""
    instance = default_instance
    if "=" in spec:
        instance, spec = spec.split("=", 1)
    pub, _, replay = spec.partition(",")
    if not instance:
        raise ValueError(
            f"KV events endpoint {spec!r}: more endpoints than backends; name it URL=ENDPOINT"
        )
    return instance, pub, replay or None


class KVEventSubscriber:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        instance: str,
        endpoint: str,
        replay: str | None,
        index: KVIndex,
        metrics: RouterMetrics,
        topic: str = "",
    ) -> None:
        self.ctx, self.instance, self.endpoint, self.replay = ctx, instance, endpoint, replay
        self.index, self.metrics, self.topic = index, metrics, topic
        self.last_seq = -1

    async def run(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sub.connect(self.endpoint)
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    continue
                await self.on_message(int.from_bytes(frames[1], "big", signed=True), frames[2])
        finally:
            sub.close(linger=0)

    async def on_message(self, seq: int, payload: bytes) -> None:
        if seq <= self.last_seq:
            log.warning(
                "KV events of %s restarted at seq %d; forgetting its blocks", self.instance, seq
            )
            self.index.clear(self.instance)
        elif seq > self.last_seq + 1:
            self.metrics.kv_gaps.labels(self.instance).inc()
            if self.replay:
                await self._replay_from(self.last_seq + 1, seq)
        self._apply(payload)
        self.last_seq = seq

    def _apply(self, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except (BadEventBatch, KeyError, TypeError, ValueError) as e:
            log.warning("bad KV event batch from %s: %s", self.instance, e)
            return
        self.index.apply(self.instance, batch.events)
        self.metrics.kv_events.labels(self.instance).inc(len(batch.events))

    async def _replay_from(self, first: int, upto: int) -> None:
        """Apply buffered batches ``first <= seq < upto`` from the replay socket."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.connect(self.replay)
        try:
            await sock.send_multipart([b"", first.to_bytes(8, "big")])
            while await sock.poll(REPLAY_TIMEOUT_MS):
                _, seq_b, payload = await sock.recv_multipart()
                seq = int.from_bytes(seq_b, "big", signed=True)
                if seq == END_SEQ:
                    return
                if first <= seq < upto:
                    self._apply(payload)
            log.warning("KV event replay from %s timed out", self.instance)
        finally:
            sock.close(linger=0)
