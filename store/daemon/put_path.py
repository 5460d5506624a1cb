"""A stream connection's put: payloads on the socket, in the client's region, or read
out of the client's memory (cross-memory attach), one path for all three.

A put is one frame listing its chunks in groups (store/wire/put_frame.py), then the
payloads (or their region offsets, or their addresses). The whole request is checked
before anything is stored: its shape and size (Put.from_wire, checks.py), the token's
right to write these keys (auth.py), every header; then the payloads are received in
groups, straight into pages the first tier reserved where it can, verified, and only
once all are good published at once. A refused inline put's payload bytes are read and
dropped, so the connection stays in step.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from kvcore.chunk import Chunk
from store.daemon.auth import PermissionDenied
from store.daemon.checks import BadRequest, OverLimit
from store.daemon.get_path import flat_buffers
from store.wire import cma
from store.wire import messages as m
from store.wire.put_frame import KEYS, OFFSETS
from store.wire.shm import NONCE_BYTES, RegionError
from store.wire.stream import recv_buffers, recv_exactly, send_frame

if TYPE_CHECKING:
    from store.daemon.session import Session

PUT_GROUP_BYTES = 1 << 20
"""A socket put is received and verified in groups of about this many bytes, all
on the connection's thread: the socket's own buffers keep the client sending meanwhile,
and a group hashes at ~18 GB/s right after it arrived, against ~14 for 4 MiB groups.
Measured against a helper thread storing 4 MiB groups while the next arrives (the
GIL serialised the two): stream put 2.94-3.14 → 3.60-3.68 GB/s at 1 MiB chunks."""

CMA_GROUP_BYTES = 4 << 20
"""A cross-memory-attach (or region) put is copied in groups of about this many bytes
while the helper thread verifies and stores the last group: there the copy is this
thread's own work (``process_vm_readv`` and ``preadv`` release the GIL), and doing both
on one thread measured 25% slower."""


class OutOfStep(Exception):
    """Payload bytes of a refused request were not read: answer, then drop the connection."""


Fill = Any  # fill(start, end, buffers): chunks start:end into buffers; None: the socket


class StreamPut:
    """The put of one session, with the staging buffer it reuses from put to put."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.service = session.service
        self.staging = np.empty(0, dtype=np.uint8)  # payloads the first tier did not reserve

    def serve(self, meta: dict[str, Any]) -> None:
        session, inline = self.session, not meta.get("region") and meta.get("cma") is None
        try:
            put = m.Put.from_wire(meta)
            sizes = self.service.put_sizes(put)
        except OverLimit as exc:
            if inline:
                self._discard(exc.nbytes)  # keep the stream in step
            raise BadRequest(str(exc)) from None
        except BadRequest as exc:  # inline: no telling how many bytes follow, so hang up
            raise (OutOfStep if inline else BadRequest)(str(exc)) from None
        try:  # may this token write, and these keys (auth.py)? Else nothing is stored
            self._authorize(put.chunks)
            # every header before any payload: a bad one costs no store work
            headers = self.service.check_groups(put.chunks, put.fp)
        except (PermissionDenied, BadRequest):
            if inline:
                self._discard(sum(sizes))  # keep the stream in step
            raise
        if put.cma is not None:
            fill = self._cma_source(put.cma, sizes)
        elif put.region:
            fill = self._region_source(put, sizes)
        else:
            fill = None
        stored = self._receive_and_store(headers, sizes, fill)
        session.activity.bytes.labels("in", session.wire if inline else "shm").inc(sum(sizes))
        send_frame(session.conn, m.PutReply(stored).to_wire())

    def _authorize(self, groups: list[list[Any]]) -> None:
        grant = self.session.grant
        if grant is None:  # (the session lets no unauthenticated request this far)
            raise PermissionDenied("send hello with the bearer token first")
        grant.check("Put")
        if grant.salt_tag is not None:
            for g in groups:
                grant.check_own(g[KEYS], "Put")

    def _cma_source(self, addrs: Any, sizes: list[int]) -> Fill:
        """A ``fill`` that copies chunk ``i``'s payload from ``addrs[i]`` in the client's
        memory (a connection whose attach proved it may)."""
        session = self.session
        pid = session.cma_pid
        # The nonce again, before every put: the pid must still be the client's process
        # (not a reused pid, not the image of an exec).
        if (
            pid is None
            or session.region is None
            or probe_cma(pid, session.cma_at, session.cma_nonce) is None
        ):
            session.cma_pid = None
            raise BadRequest(f"{cma.REFUSED} (this connection may not; send payloads instead)")
        if not isinstance(addrs, list) or len(addrs) != len(sizes):
            raise BadRequest("cma needs one payload address per chunk")
        if not all(type(a) is int and 0 <= a < 1 << 64 for a in addrs):
            raise BadRequest("payload addresses must be non-negative integers")

        def fill(start: int, end: int, buffers: list[Any]) -> None:
            remote = [(addrs[i], sizes[i]) for i in range(start, end)]
            try:
                cma.read(pid, buffers, remote)
            except OSError:  # one message for every cause: no oracle on the memory
                raise BadRequest(cma.REFUSED) from None

        return fill

    def _region_source(self, put: m.Put, sizes: list[int]) -> Fill:
        """A ``fill`` that reads chunk ``i``'s payload from its offset in the window of
        the client's region."""
        region, base, length = self.session.window(put.offset, put.length)
        offsets = [off for g in put.chunks for off in g[OFFSETS]]
        for off, n in zip(offsets, sizes, strict=True):
            if type(off) is not int or off < 0 or off + n > length:
                raise BadRequest(f"payload at {off}+{n} is outside the window of {length}")

        def fill(start: int, end: int, buffers: list[Any]) -> None:
            views = iter(buffers)
            for off, n in zip(offsets[start:end], sizes[start:end], strict=True):
                mine, got = [], 0
                while got < n:  # this chunk's buffers: one staging slice or its pages
                    mine.append(next(views))
                    got += mine[-1].nbytes
                try:
                    region.read(base + off, mine)
                except RegionError as exc:
                    raise BadRequest(str(exc)) from None

        return fill

    def _receive_and_store(self, headers: list[Any], sizes: list[int], fill: Fill) -> list[bool]:
        """Read the payloads in groups (from the socket, or by ``fill(start, end,
        buffers)``: chunks ``start:end`` into ``buffers``) and verify each group: on this
        thread for the socket, on the helper thread while the next group is copied for
        ``fill``. Chunks the first tier can reserve (``TieredStore.reserve``) are received
        straight into its pages; the rest go through this connection's staging buffer
        (reused across puts). Once every payload is verified, all are published at once
        (``commit``, ``put``): if one fails its checksum, nothing of the request was
        stored, its reserved pages are freed, and the request is refused."""
        store, verify = self.service.store, self.service.verify_payloads
        inline = fill is None  # see PUT_GROUP_BYTES and CMA_GROUP_BYTES
        group_bytes = PUT_GROUP_BYTES if inline else CMA_GROUP_BYTES
        places = store.reserve(headers)
        staged = sum(n for n, p in zip(sizes, places, strict=True) if p is None)
        if self.staging.nbytes < staged:
            self.staging = np.empty(staged, dtype=np.uint8)
        view = memoryview(self.staging)
        payloads: list[Any] = []
        checks: list[Future] = []  # the helper's verification of each group (fill)
        published = False
        start = pos = 0
        try:
            while start < len(sizes):
                end, nbytes = start, 0
                while end < len(sizes) and (end == start or nbytes < group_bytes):
                    nbytes += sizes[end]
                    end += 1
                for n, place in zip(sizes[start:end], places[start:end], strict=True):
                    if place is None:
                        payloads.append(view[pos : pos + n])
                        pos += n
                    else:
                        payloads.append(place)
                group = payloads[start:end]
                buffers = [  # pool pages and staging slices are byte views already
                    b if type(b) is memoryview and b.format == "B" else memoryview(b).cast("B")
                    for b in flat_buffers(group)
                ]
                if inline:
                    recv_buffers(self.session.conn, buffers)
                    try:
                        verify(headers[start:end], group)
                    except BadRequest:  # refused: read the rest only to keep the stream in step
                        self._discard(sum(sizes[end:]))
                        raise
                else:
                    fill(start, end, buffers)
                    checks.append(self.session.io().submit(verify, headers[start:end], group))
                start = end
            for check in checks:
                check.result()
            stored = self._publish(headers, payloads, places)
            published = True
            return stored
        finally:
            for check in checks:  # nothing may still read these pages after this
                check.exception()
            if not published and any(p is not None for p in places):
                store.commit(headers, [False] * len(headers))  # free the reserved pages

    def _publish(self, headers: list[Any], payloads: list[Any], places: list[Any]) -> list[bool]:
        """Publish the verified chunks of a put: commit the reserved ones, put the others;
        per chunk, whether it is stored."""
        service = self.service
        mine = [i for i, p in enumerate(places) if p is None]
        lent = [i for i, p in enumerate(places) if p is not None]
        for i in lent:  # (``put`` records the sizes of the others)
            service.sizes.add(headers[i].key, headers[i].nbytes)
        if not mine:  # every chunk in reserved pages: the common case
            return service.store.commit(headers, [True] * len(headers))
        stored = [False] * len(headers)
        chunks = [Chunk(headers[i], payloads[i]) for i in mine]
        for i, ok in zip(mine, service.put(chunks), strict=True):
            stored[i] = ok
        if lent:
            got = service.store.commit([headers[i] for i in lent], [True] * len(lent))
            for i, ok in zip(lent, got, strict=True):
                stored[i] = ok
        return stored

    def _discard(self, nbytes: int) -> None:
        """Read and drop ``nbytes`` payload bytes of a refused put."""
        scratch = memoryview(bytearray(min(nbytes, 1 << 20)))
        while nbytes:
            n = min(nbytes, scratch.nbytes)
            recv_exactly(self.session.conn, scratch[:n])
            nbytes -= n


def probe_cma(pid: int, at: Any, nonce: bytes) -> int | None:
    """``pid`` if this process can read its memory and finds the region's nonce at
    ``at`` there (so it is the client that mapped the region), else None."""
    if not (type(at) is int and at > 0 and cma.available()):
        return None
    probe = bytearray(NONCE_BYTES)
    try:
        cma.read(pid, [probe], [(at, NONCE_BYTES)])
    except (OSError, ValueError):
        return None
    return pid if bytes(probe) == nonce else None
