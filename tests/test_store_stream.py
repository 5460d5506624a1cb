"""The bulk stream's framing over a real socket pair: many buffers, odd sizes, large ones."""

from __future__ import annotations

import socket
import threading

import numpy as np

from store.wire import stream
from store.wire.stream import recv_buffers, recv_frame, send_frame


def test_buffers_of_any_size_and_count_arrive_whole_and_in_order():
    rng = np.random.default_rng(0)
    sizes = [0, 1, 7, stream.SEND_BYTES - 3, stream.SEND_BYTES, 3 * stream.SEND_BYTES + 5]
    sizes += [100] * (2 * stream.IOV_MAX + 9)  # more views than one call may carry
    # A socket pair's buffers are far smaller than this: sends are partial, often.
    sent = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    got = [np.zeros(n, np.uint8) for n in sizes]
    a, b = socket.socketpair()
    with a, b:
        writer = threading.Thread(target=send_frame, args=(a, {"n": len(sent)}, *sent))
        writer.start()
        assert recv_frame(b) == {"n": len(sent)}
        recv_buffers(b, [memoryview(g) for g in got])
        writer.join()
        assert all(np.array_equal(s, g) for s, g in zip(sent, got, strict=True))
