"""The same-host transport: shared memory between client and daemon.

Gets copy first-tier hits out of the daemon's shared pool, mapped read-only (the daemon
pins them until this client says ``release``); other hits cross a region the client
created and the daemon wrote. Puts are read by the daemon straight out of this process
(cross-memory attach) where permitted, else cross the region. A connection without a
region (another host, a refused attach) takes the stream transport instead, as does a
get whose next payload does not fit the largest region.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvcore.buffers import host_array
from kvcore.chunk import Chunk, host_view
from kvcore.shared_memory import PoolMapping
from store.client.stream import StreamTransport
from store.client.transport import (
    Conn,
    Offset,
    Transport,
    deliver,
    destination,
    header,
    replies,
    tail,
)
from store.wire import cma
from store.wire import messages as m
from store.wire.constants import CLIENT_MAX_REGION_BYTES, IN_POOL, WINDOW_START, aligned
from store.wire.put_frame import put_groups
from store.wire.same_host import redeem
from store.wire.shm import Region
from store.wire.stream import RemoteError, check_reply, recv_frame, send_frame


class RegionLink:
    """This client's side of same-host sharing: whether the daemon maps its regions
    (``ok``; None until an attach was tried) and its mapping of each daemon's pool."""

    def __init__(self, connect_timeout: float, lock: threading.Lock, ok: bool | None) -> None:
        self.connect_timeout = connect_timeout
        self.lock = lock  # the client's
        self.ok = ok
        self.pools: dict[str, PoolMapping] = {}

    def forget_pools(self) -> None:
        """Drop this client's pool mappings (each unmapped once no connection uses it)."""
        with self.lock:
            self.pools = {}

    def attach(self, sock: Any, size: int) -> tuple[Region | None, Any]:
        """A region the daemon has mapped, or None if it cannot (another host); and this
        client's mapping of the daemon's shared pool, when it has one. Then, at the
        daemon's same-host door (store/wire/same_host.py), this process shows who it
        is, so the daemon may read its puts from its memory (``region.cma``)."""
        region = Region.create(size)
        try:
            send_frame(
                sock, m.Attach(region.name, region.nonce, cma.address(region.array)).to_wire()
            )
            reply = m.AttachReply.from_wire(check_reply(recv_frame(sock)))
        except RemoteError as exc:
            region.close()
            if exc.code != "INVALID_ARGUMENT":
                raise
            self.ok = False
            return None, None
        finally:
            region.unlink()  # both sides have it mapped (or it failed): the name can go
        if reply.door is None:
            return region, None
        came_in, fd = redeem(reply.door, self.connect_timeout)
        pool = self._pool(reply.door, fd)
        if came_in and cma.available():
            send_frame(sock, m.Cma().to_wire())
            region.cma = m.CmaReply.from_wire(check_reply(recv_frame(sock))).allowed
        return region, pool

    def grow(self, conn: Conn, size: int) -> bool:
        """Replace the connection's region by one of at least ``size`` bytes."""
        size = max(size, 2 * (conn.region.size if conn.region else 0))
        if size > CLIENT_MAX_REGION_BYTES:
            return False
        region, _ = self.attach(conn.sock, size)
        if region is None:
            return False
        if conn.region is not None:
            conn.region.close()
        conn.region = region
        return True

    def _pool(self, offer: dict[str, Any], fd: int | None) -> PoolMapping | None:
        """This client's read-only mapping of the daemon's shared cpu pool, mapped once
        per daemon (``fd``, when the door handed one over, is closed here)."""
        name, size = offer.get("socket"), offer.get("size")
        try:
            with self.lock:
                if name in self.pools:
                    return self.pools[name]
            if fd is None or not isinstance(size, int) or size <= 0:
                return None
            try:
                mapping = PoolMapping(fd, size)
            except (OSError, ValueError):
                return None
            with self.lock:  # another thread may have mapped it meanwhile: keep one
                if name in self.pools:
                    return self.pools[name]
                self.pools = {name: mapping}  # a restarted daemon has a new pool: drop the old
            return mapping
        finally:
            if fd is not None:
                os.close(fd)


class ShmTransport(Transport):
    def __init__(self, link: RegionLink, stream: StreamTransport) -> None:
        self.link = link
        self.stream = stream  # for connections without a region, and what does not fit

    def get(self, conn: Any, keys: list[str], outs: Any, fp: Any, results: Any) -> None:
        if conn.region is None:
            return self.stream.get(conn, keys, outs, fp, results)
        start = 0
        while start < len(keys):
            region = conn.region
            length = region.size - WINDOW_START
            ask = m.Get(keys[start:], fp, True, WINDOW_START, length, conn.pool is not None)
            send_frame(conn.sock, ask.to_wire())
            done = 0
            for meta in replies(conn.sock):
                if "part" not in meta:
                    end = m.GetDone.from_wire(meta)
                    done = end.done
                    if end.release:  # copied out of the pool: its pages may go
                        send_frame(conn.sock, m.Release().to_wire())
                        # Only the daemon's answer shows the pages were still pinned
                        # while we copied (a stall past its timeout loses the
                        # connection instead, and this get fails: no stale bytes).
                        check_reply(recv_frame(conn.sock))
                    break
                self._copy_part(conn, meta["part"], keys, start, outs, results)
            if done == 0:  # the next payload does not fit: a bigger region, or the socket
                if not self.link.grow(conn, 2 * region.size):
                    rest = Offset(results, start)
                    self.stream.get(conn, keys[start:], tail(outs, start), fp, rest)
                    return None
            start += done
        return None

    @staticmethod
    def _copy_part(
        conn: Conn, rows: list[Any], keys: list[str], start: int, outs: Any, results: Any
    ) -> None:
        """Copy one part's payloads out of the region (or the pool) into place."""
        region = conn.region
        assert region is not None
        for row in rows:
            index, offset = row[0], row[2]
            h = header(row[1], index, len(keys) - start)
            dst, final = destination(outs, start + index, h.nbytes)
            if offset == IN_POOL:
                if conn.pool is None or not conn.pool.read(row[3], dst):
                    raise RemoteError("INTERNAL", "daemon named pool pages out of range")
            else:
                at = WINDOW_START + offset
                src = region.array[at : at + h.nbytes]
                if src.nbytes != h.nbytes:
                    raise RemoteError("INTERNAL", "daemon placed a payload outside the region")
                np.copyto(dst, src)
            results[start + index] = Chunk(h, deliver(dst, final, h.nbytes))

    def put(self, conn: Any, chunks: Sequence[Chunk], fp: bytes | None) -> list[bool]:
        if conn.region is None:
            return self.stream.put(conn, chunks, fp)
        if conn.cma:  # the daemon copies each payload straight out of this process
            views = [host_view(c.payload) for c in chunks]  # alive until the answer
            groups = put_groups(chunks, [v.nbytes for v in views])
            addrs = [cma.address(v) for v in views]
            send_frame(conn.sock, m.Put(groups, fp, cma=addrs).to_wire())
            try:
                return m.PutReply.from_wire(check_reply(recv_frame(conn.sock))).stored
            except RemoteError as exc:
                # Memory the daemon cannot read (device-mapped or RDMA-registered
                # buffers, a process made undumpable): send the payloads instead, from now on.
                if exc.code != "INVALID_ARGUMENT" or cma.REFUSED not in exc.message:
                    raise
                conn.region.cma = False
        need = WINDOW_START + sum(aligned(host_view(c.payload).nbytes) for c in chunks)
        if need > conn.region.size and not self.link.grow(conn, need):
            return self.stream.put(conn, chunks, fp)
        region = conn.region
        sizes, offsets, pos = [], [], 0
        for c in chunks:
            view = host_view(c.payload)
            n = view.nbytes
            np.copyto(region.array[WINDOW_START + pos : WINDOW_START + pos + n], host_array(view))
            sizes.append(n)
            offsets.append(pos)
            pos += aligned(n)
        groups = put_groups(chunks, sizes, offsets)
        length = region.size - WINDOW_START
        send_frame(conn.sock, m.Put(groups, fp, True, WINDOW_START, length).to_wire())
        return m.PutReply.from_wire(check_reply(recv_frame(conn.sock))).stored
