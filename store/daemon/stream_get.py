"""A stream connection's get: the one get path (get_path.py), delivered on the socket or
into the client's shared memory.

A get answers in parts: a frame listing hits (index, header[, offset]), then, on the
socket path, their payloads; with ``region`` the payloads are in shared memory: in the
client's region, or (``pool``) where they lie in the daemon's cpu pool, which the client
maps read-only (same_host.py), pinned until the client sends ``release``. Either way the
connection's helper thread fetches part *n+1* while this thread delivers part *n*.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from store.daemon.auth import Visible
from store.daemon.get_path import Placed, flat_buffers
from store.wire import messages as m
from store.wire.constants import IN_POOL, PART_BYTES
from store.wire.shm import RegionError, RegionFile
from store.wire.stream import StreamClosed, recv_frame, send_frame

if TYPE_CHECKING:
    from store.daemon.session import Session

BOUNCE_BYTES = 16 << 20
"""A region get's window is at most this (or the chunk limit, if larger): the payloads
pass through a private buffer of that size on their way into the client's region."""


class StreamGet:
    """The get of one session, with the buffers it reuses from request to request."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.service = session.service
        self.out_bufs = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]  # socket
        self.bounce = np.empty(0, dtype=np.uint8)  # region gets, on their way to the region

    def serve(self, meta: dict[str, Any]) -> None:
        get = m.Get.from_wire(meta)
        seen = self._visible(get.keys)  # a salt-bound grant's get misses other salts' keys
        if get.region:
            return self._into_region(get, seen)
        return self._on_socket(get, seen)

    def _visible(self, keys: list[Any]) -> Visible:
        """The keys of a get this connection's grant may see (checked, when it is bound
        to a salt; checked before the get otherwise)."""
        grant = self.session.grant
        if grant is None or grant.salt_tag is None:
            return Visible(keys, None, len(keys))
        return grant.visible(self.service.check_keys(keys))

    def _on_socket(self, get: m.Get, seen: Visible) -> None:
        """Part frames, each followed by its payloads (lent pages sent straight from the
        first tier, the rest from the two staging buffers, one per part in flight)."""
        session, conn, fp = self.session, self.session.conn, get.fp
        keys = self.service.check_keys(seen.keys)
        spans = self.service.gets.spans(keys)
        encode = self.service.prefixes.encode
        give_back = self.service.store.give_back
        sent = 0
        pending: Future | None = None
        try:
            if spans:
                pending = session.io().submit(self._fetch, keys, spans[0], fp, 0)
            for i in range(len(spans)):
                assert pending is not None
                placed, lent = pending.result()
                pending = None
                try:
                    if i + 1 < len(spans):  # fetch the next part into the other buffer meanwhile
                        slot = (i + 1) % 2
                        pending = session.io().submit(self._fetch, keys, spans[i + 1], fp, slot)
                    rows = [[p.index, encode(p.header)] for p in placed]
                    seen.reposition(rows)  # (a salt-bound grant's get)
                    payloads = flat_buffers([p.payload for p in placed])
                    send_frame(conn, m.Part(rows).to_wire(), *payloads)
                    sent += sum(p.header.nbytes for p in placed)
                finally:  # sent (or failed): the lent pages may be reused
                    give_back(lent)
        finally:
            if pending is not None:  # the send failed: let the fetch finish with the buffer
                if pending.exception() is None:
                    give_back(pending.result()[1])
        session.activity.bytes.labels("out", session.wire).inc(sent)
        send_frame(conn, m.GetDone(seen.total).to_wire())

    def _fetch(
        self, keys: list[str], span: tuple[int, int], fp: Any, slot: int
    ) -> tuple[list[Placed], list[str]]:
        def buffer(nbytes: int) -> np.ndarray:
            if self.out_bufs[slot].nbytes < nbytes:
                self.out_bufs[slot] = np.empty(max(nbytes, PART_BYTES), dtype=np.uint8)
            return self.out_bufs[slot]

        return self.service.gets.staged(keys, span, fp, buffer)

    def _into_region(self, get: m.Get, seen: Visible) -> None:
        """The shared-memory get: the helper thread copies part *n+1* from the tiers into
        the window while this thread announces part *n* (and the client copies it out).

        A client that maps the shared pool (``"pool": true``) is instead told where first-
        tier hits lie in the pool; their pages stay pinned until it says ``release``."""
        session, conn = self.session, self.session.conn
        region, base, length = session.window(get.offset, get.length)
        # Payloads go through a private buffer (the region is never mapped here: shm.py),
        # at most this large a window per request; the client asks again for the rest.
        length = min(length, max(BOUNCE_BYTES, self.service.limits.max_chunk_bytes))
        if self.bounce.nbytes < length:
            self.bounce = np.empty(length, dtype=np.uint8)
        window = self.bounce[:length]
        encode = self.service.prefixes.encode
        sent = 0
        door = session.server.same_host
        lent: list[str] | None = [] if get.pool and door and door.nbytes else None
        keys = self.service.check_keys(seen.keys)
        lend_bytes = door.nbytes // 4 if door else 0
        parts = self.service.gets.into_window(keys, get.fp, window, lent, lend_bytes)
        pending: Future | None = session.io().submit(next, parts, None)
        try:
            while pending is not None:
                item = pending.result()
                pending = None
                if item is None or isinstance(item, int):
                    done = seen.done(item or 0)
                    send_frame(conn, m.GetDone(done, bool(lent)).to_wire())
                    break
                pending = session.io().submit(next, parts, None)
                _flush(region, base, window, item)
                rows = [
                    [p.index, encode(p.header), p.offset]
                    if p.offset != IN_POOL
                    else [p.index, encode(p.header), IN_POOL, [x for run in p.payload for x in run]]
                    for p in item
                ]
                seen.reposition(rows)  # (a salt-bound grant's get)
                sent += sum(p.header.nbytes for p in item)
                send_frame(conn, m.Part(rows).to_wire())
            if lent:
                self._await_release()
        finally:
            if pending is not None:
                pending.exception()
            parts.close()
            if lent:
                self.service.store.give_back(lent)
        session.activity.bytes.labels("out", "shm").inc(sent)

    def _await_release(self) -> None:
        """Wait for the client to say it has copied the lent chunks out of the pool, and
        confirm. A client that does not within RELEASE_TIMEOUT loses its connection, so
        its pins cannot outlive it, and never gets the confirmation its copies need."""
        session = self.session
        session.conn.settimeout(session.server.release_timeout)
        try:
            meta = recv_frame(session.conn, session.limits)
        except TimeoutError:
            raise StreamClosed("no release of lent pool pages in time") from None
        finally:
            session.conn.settimeout(None)
        m.Release.from_wire(meta)  # anything else: StreamClosed
        # The pages were still pinned when the release came: the client's copies are
        # good. A client that hears nothing (the timeout dropped it) discards them.
        send_frame(session.conn, m.Release(released=True).to_wire())


def _flush(region: RegionFile, base: int, window: np.ndarray, placed: list[Placed]) -> None:
    """Write the payloads of a get's part from ``window`` (the private buffer) to the
    same place in the client's region (``base`` + their offsets)."""
    spans = [(p.offset, p.offset + p.header.nbytes) for p in placed if p.offset != IN_POOL]
    if spans:
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        try:
            region.write(base + lo, [window[lo:hi]])
        except RegionError as exc:
            raise m.BadRequest(str(exc)) from None
