"""The stream transport: frames and payloads on the daemon's stream port (or the same
frames over UCX), payloads straight into the caller's buffers with one scattered read
per part, and a put's payloads gathered behind its frame."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcore.chunk import Chunk, host_view
from store.client.transport import Conn, Transport, deliver, destination, header, replies
from store.wire import messages as m
from store.wire.put_frame import put_groups
from store.wire.stream import check_reply, recv_buffers, recv_frame, send_frame


class StreamTransport(Transport):
    def get(self, conn: Any, keys: list[str], outs: Any, fp: Any, results: Any) -> None:
        sock = conn.sock
        send_frame(sock, m.Get(keys, fp).to_wire())
        n = len(keys)
        for meta in replies(sock):
            rows = meta.get("part", ())
            part = [(index, header(raw, index, n)) for index, raw in rows]
            places = [destination(outs, index, h.nbytes) for index, h in part]
            recv_buffers(sock, [memoryview(dst) for dst, _ in places])  # one scattered read
            for (index, h), (dst, final) in zip(part, places, strict=True):
                results[index] = Chunk(h, deliver(dst, final, h.nbytes))

    def put(self, conn: Conn | None, chunks: Sequence[Chunk], fp: bytes | None) -> list[bool]:
        assert conn is not None
        views = [host_view(c.payload) for c in chunks]  # sizes as sent, whatever headers say
        groups = put_groups(chunks, [v.nbytes for v in views])
        send_frame(conn.sock, m.Put(groups, fp).to_wire(), *views)
        return m.PutReply.from_wire(check_reply(recv_frame(conn.sock))).stored
