"""The raw-socket baseline of ``kvstore bench --url``: a process that only moves bytes.

``python -m benchmarks.peers.raw_socket`` listens on a free loopback port, prints it, and
serves one connection: ``p`` + u64 count + u64 size receives count chunks of size bytes,
each into its own buffer, then answers one byte; ``g`` sends count chunks from those
buffers. No framing, no store, no checks: the fastest a Python process can stream over
this socket while holding the bytes as a store must, in distinct memory. (Until
2026-11-30 the peer reused one buffer for every chunk: at 1 MiB that buffer stayed in
the L2 cache, and the baseline measured a cache-hot copy no store can make, e.g. 4.4
GB/s for gets at 1 MiB against 2.4 at 16 MiB.) Sends go out in calls of at most
``store.wire.stream.SEND_BYTES``, as the daemon's do: one ``sendall`` of a 16 MiB chunk ran
at 2.4-2.7 GB/s, the same bytes in 1 MiB calls at ~4 (so the baseline is what a socket
does at its best, not a handicapped one).
"""

from __future__ import annotations

import socket
import struct
import sys

from store.wire.stream import recv_into, send_buffers, tune

_OP = struct.Struct("<cQQ")


def serve(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    tune(conn)
    held: list[bytearray] = []
    while True:
        head = bytearray(_OP.size)
        try:
            recv_into(conn, memoryview(head))
        except ConnectionError:
            return
        op, count, size = _OP.unpack(head)
        if len(held) != count or (held and len(held[0]) != size):
            held = [bytearray(size) for _ in range(count)]  # touched: no page faults timed
        for buf in held:
            if op == b"p":
                recv_into(conn, memoryview(buf))
            else:
                send_buffers(conn, [buf])  # in SEND_BYTES calls, as the daemon sends
        if op == b"p":
            conn.sendall(b"k")


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    serve(listener)


if __name__ == "__main__":
    sys.exit(main())
