"""The raw-socket baseline of ``kvstore bench --url``: a process that only moves bytes.

``python -m store.daemon.bench_peer`` listens on a free loopback port, prints it, and
serves one connection: ``p`` + u64 count + u64 size receives count*size bytes (into one
reused buffer) then answers one byte; ``g`` sends count*size bytes. No framing, no
store, no checks: the fastest a Python process can stream over this socket.
"""

from __future__ import annotations

import socket
import struct
import sys

from store.stream import recv_into, tune

_OP = struct.Struct("<cQQ")


def serve(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    tune(conn)
    buf = bytearray(0)
    while True:
        head = bytearray(_OP.size)
        try:
            recv_into(conn, memoryview(head))
        except ConnectionError:
            return
        op, count, size = _OP.unpack(head)
        if len(buf) < size:
            buf = bytearray(size)
        view = memoryview(buf)[:size]
        for _ in range(count):
            if op == b"p":
                recv_into(conn, view)
            else:
                conn.sendall(view)
        if op == b"p":
            conn.sendall(b"k")


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    serve(listener)


if __name__ == "__main__":
    sys.exit(main())
