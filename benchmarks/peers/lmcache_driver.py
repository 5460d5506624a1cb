"""LMCache's standalone server, measured like the daemon (``kvstore bench --url --lmcache-venv``).

Runs *inside LMCache's own virtual environment* (it imports ``lmcache`` and ``torch``,
nothing of this repository), as ``VENV/bin/python benchmarks/peers/lmcache_driver.py``:
starts ``VENV/bin/lmcache_server 127.0.0.1 PORT cpu``, prints ``{"ready": true}``, then
for each ``{"size", "count"}`` line on stdin puts one batch of ``count`` chunks of
``size`` bytes and gets it back, and prints ``{"put", "get"}`` in seconds. The bench
sends one such line in every repeat, next to its other measurements, so LMCache sees the
same background load as the daemon and the baselines.

The client side speaks LMCache's own protocol with its own classes
(``lmcache.v1.protocol.ClientMetaMessage`` / ``ServerMetaMessage``, ``CacheEngineKey``)
exactly as its remote connector (``lmcache.v1.storage_backend.connector.lm_connector``)
does, minus the asyncio hop: a PUT is a meta message followed by the payload, a GET a
meta message answered by a meta message and the payload, read with ``recv_into`` into a
preallocated buffer. PUT has no reply, so a put batch is timed up to the answer of an
EXIST sent after it (the server handles one connection's commands in order).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        r = sock.recv_into(view[got:], view.nbytes - got)
        if not r:
            raise ConnectionError("lmcache_server closed the connection")
        got += r


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()

    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.protocol import (
        ClientCommand,
        ClientMetaMessage,
        ServerMetaMessage,
        ServerReturnCode,
    )

    server_bin = os.path.join(os.path.dirname(sys.executable), "lmcache_server")
    if not os.path.exists(server_bin):
        server_bin = shutil.which("lmcache_server") or server_bin
    port = _free_port()
    proc = subprocess.Popen(
        [server_bin, "127.0.0.1", str(port), "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=120)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("lmcache_server did not start") from None
                time.sleep(0.2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fmt = MemoryFormat.KV_2LTD
        head = bytearray(ServerMetaMessage.packlength())
        batches: dict[int, tuple[list, list]] = {}

        def meta(command, key, length=0, shape=(0, 0, 0, 0)):
            return ClientMetaMessage(
                command, key, length, fmt, torch.uint8, torch.Size(shape)
            ).serialize()

        def reply():
            _recv_into(sock, memoryview(head))
            return ServerMetaMessage.deserialize(bytes(head))

        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:  # one {"size", "count"} per measurement, answered in seconds
            req = json.loads(line)
            size, count = int(req["size"]), int(req["count"])
            if size not in batches:
                batches[size] = (
                    [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(count)],
                    [bytearray(size) for _ in range(count)],
                )
            payloads, outs = batches[size]
            # the same keys each time: the server has no delete, and a PUT of a key it
            # holds replaces the object (the same work as a new one), so memory stays flat
            keys = [
                CacheEngineKey("kvstore-bench", 1, 0, size * 4096 + i, torch.uint8)
                for i in range(count)
            ]
            start = time.perf_counter()
            for key, p in zip(keys, payloads, strict=True):
                sock.sendall(meta(ClientCommand.PUT, key, size, (size, 1, 1, 1)))
                sock.sendall(memoryview(p.numpy()))
            sock.sendall(meta(ClientCommand.EXIST, keys[-1]))
            if reply().code != ServerReturnCode.SUCCESS:
                raise RuntimeError("lmcache_server lost a put")
            put = time.perf_counter() - start
            start = time.perf_counter()
            for key, out in zip(keys, outs, strict=True):
                sock.sendall(meta(ClientCommand.GET, key))
                got = reply()
                if got.code != ServerReturnCode.SUCCESS or got.length != size:
                    raise RuntimeError("lmcache_server missed a get")
                _recv_into(sock, memoryview(out))
            get = time.perf_counter() - start
            if outs[0] != bytes(payloads[0].numpy()):
                raise RuntimeError("lmcache_server returned wrong bytes")
            print(json.dumps({"put": put, "get": get}), flush=True)
        sock.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
