"""The daemon's one get path, whatever carries the bytes.

Every get (socket stream, shared-memory region, gRPC) goes through ``GetPath.fetch``:
the checked keys cut into parts of about PART_BYTES (``spans``), each part's hits
taken from the first tier's loans where the caller can use them (read-only views of its
pages for a socket send, runs of the shared pool for a client that maps it), the rest
read from the tiers into the caller's buffers (a reused staging buffer, the client's
window, or fresh arrays), then filtered by fingerprint. The callers differ only in
where the bytes go: ``staged`` (the stream sends them: stream_get.py), ``into_window``
(the client's region: stream_get.py) and ``parts`` (gRPC messages: grpc_api.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from kvcore.buffers import host_array
from kvcore.chunk import Chunk, ChunkHeader, encode_prefix
from store.tiered import TieredStore
from store.wire.constants import IN_POOL, PART_BYTES, aligned


class Placed(NamedTuple):
    """A hit of a get: the key's position in the request, its header, where its payload is
    (byte offset in the client's window, IN_POOL, or None when it follows the frame
    inline), and the payload (a buffer, or a list of page views or pool runs)."""

    index: int
    header: ChunkHeader
    offset: int | None
    payload: Any


class SizeIndex:
    """Payload size of recently seen keys, so a get can place payloads in a client's
    shared-memory window before reading them. A key names content, so its size never
    changes; the index forgets the oldest keys past ``capacity``."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.capacity = capacity
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def get(self, key: str) -> int | None:
        return self._sizes.get(key)

    def add(self, key: str, nbytes: int) -> None:
        self._sizes[key] = nbytes
        if len(self._sizes) > self.capacity:
            self._sizes.popitem(last=False)


class PrefixCache:
    """``encode_prefix`` of recently served headers: every hit of every get sends its
    header, and packing one (msgpack) costs a few µs, as much as moving 16 KiB. A hit is
    the same header object the cpu tier holds (or an equal one), so it is never stale.
    Bounded: the map is dropped when it reaches ``limit`` entries; thread-safe (one dict
    lookup or store per call)."""

    def __init__(self, limit: int = 1 << 16) -> None:
        self.limit = limit
        self._encoded: dict[str, tuple[ChunkHeader, bytes]] = {}

    def encode(self, header: ChunkHeader) -> bytes:
        hit = self._encoded.get(header.key)
        if hit is not None and (hit[0] is header or hit[0] == header):
            return hit[1]
        raw = encode_prefix(header)
        if len(self._encoded) >= self.limit:
            self._encoded = {}
        self._encoded[header.key] = (header, raw)
        return raw


class GetPath:
    """Gets of checked keys from ``store``; ``sizes`` learns each hit's payload size."""

    def __init__(self, store: TieredStore, sizes: SizeIndex) -> None:
        self.store = store
        self.sizes = sizes

    def spans(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        """``[start, end)`` of each part of a get of ``keys`` (about PART_BYTES each)."""
        parts, start = [], 0
        while start < len(keys):
            end = self._part_end(keys, start)
            parts.append((start, end))
            start = end
        return parts

    def fetch(
        self,
        part: list[str],
        start: int,
        fingerprint: bytes | None,
        loans: list[Any],
        outs: list[Any] | None = None,
        offsets: list[Any] | None = None,
    ) -> list[Placed]:
        """The one get: hits of ``part`` (the request's keys from index ``start`` on).

        ``loans[i]``: (header, payload) the first tier lent for key ``i``, or None: that
        key is read from the tiers, into ``outs[i]`` where given (None: a fresh buffer).
        ``offsets[i]``: where its payload is placed for the client (None: nowhere yet)."""
        offsets = offsets or [None] * len(part)
        rest = [i for i, x in enumerate(loans) if x is None]
        if not rest:  # all lent: the common case of a hot cache, without the detours
            return self._lent_hits(start, part, loans, fingerprint, offsets)
        got: list[Chunk | None] = [None if x is None else Chunk(x[0], x[1]) for x in loans]
        dests = None if outs is None else [outs[i] for i in rest]
        for i, chunk in zip(rest, self.store.get([part[i] for i in rest], dests), strict=True):
            got[i] = chunk
        return self._hits(start, got, fingerprint, offsets)

    # -- where the bytes go ---------------------------------------------------------
    def parts(self, keys: list[str], fingerprint: bytes | None) -> Iterator[list[Placed]]:
        """Hits of ``keys`` in parts, payloads in fresh buffers (gRPC)."""
        for start, end in self.spans(keys):
            yield self.fetch(keys[start:end], start, fingerprint, [None] * (end - start))

    def staged(
        self,
        keys: list[str],
        span: tuple[int, int],
        fingerprint: bytes | None,
        buffer: Callable[[int], np.ndarray],
    ) -> tuple[list[Placed], list[str]]:
        """Hits of ``keys[start:end]`` and the keys lent by the first tier (the socket).

        Hits the first tier can lend (``TieredStore.borrow``) come as lists of read-only
        views of its pages, pinned: the caller sends them and then ``store.give_back``s
        the lent keys (always, even when it sends nothing). Other payloads of keys of
        known size land back to back in ``buffer(nbytes)`` (a caller's reused staging
        buffer), the rest in fresh buffers."""
        start, end = span
        part = keys[start:end]
        loans = self.store.borrow(part)
        lent_keys = [k for k, item in zip(part, loans, strict=True) if item is not None]
        try:
            outs: list[np.ndarray | None] = [None] * len(part)
            rest = [i for i, x in enumerate(loans) if x is None]
            if rest:
                sizes = [self.sizes.get(part[i]) for i in rest]
                buf = buffer(sum(aligned(n) for n in sizes if n is not None))
                pos = 0
                for i, n in zip(rest, sizes, strict=True):
                    if n is not None:
                        outs[i] = buf[pos : pos + n]
                        pos += aligned(n)
            return self.fetch(part, start, fingerprint, loans, outs), lent_keys
        except BaseException:
            self.store.give_back(lent_keys)
            raise

    def into_window(
        self,
        keys: list[str],
        fingerprint: bytes | None,
        window: np.ndarray,
        lent: list[str] | None = None,
        lend_bytes: int = 0,
    ) -> Iterator[list[Placed] | int]:
        """Hits of ``keys`` written into ``window`` (a client's shared memory), in parts.

        Payloads of keys whose size is known go straight from the tiers into the window;
        others are fetched, then copied. Keys are taken in order while they fit; the last
        item yielded is how many keys were handled (the client asks again for the rest).

        With ``lent`` (the client maps the first tier's shared pool), first-tier hits are
        not copied at all: each comes with offset ``IN_POOL`` and its pool runs as
        payload, pinned, its key appended to ``lent``; the caller ``give_back``s them
        once the client has read them. They take no room in the window. Past about
        ``lend_bytes`` lent in one request, hits are copied into the window instead, so
        one request cannot pin the whole tier against eviction.
        """
        pos = start = lent_total = 0
        while start < len(keys):
            end = self._part_end(keys, start)
            part = keys[start:end]
            lending = lent is not None and lent_total < lend_bytes
            loans = self.store.lend(part) if lending else [None] * len(part)
            cut = start
            try:
                places: list[int | None] = []
                for k, loan in zip(part, loans, strict=True):
                    size = None if loan is not None else self.sizes.get(k)
                    if size is not None and pos + size > window.nbytes:
                        break
                    places.append(IN_POOL if loan is not None else None if size is None else pos)
                    pos += aligned(size or 0)
                placed, pos, stop = self._fetch_into(
                    part, start, places, loans, window, pos, fingerprint
                )
                cut = start + len(places) if stop is None else stop
            finally:  # lent hits past the cut were not placed: their pins go now
                kept = cut - start
                late = [k for k, x in zip(part[kept:], loans[kept:], strict=True) if x is not None]
                self.store.give_back(late)
                if lent is not None:
                    kept_loans = [
                        (k, x) for k, x in zip(part[:kept], loans[:kept], strict=True) if x
                    ]
                    lent += [k for k, _ in kept_loans]
                    lent_total += sum(x[0].nbytes for _, x in kept_loans)
            if cut == start:  # the first payload does not fit
                break
            yield [p for p in placed if p.index < cut]
            start = cut
            if start < end:  # the next payload does not fit
                break
        yield start

    def _fetch_into(
        self,
        part: list[str],
        start: int,
        places: list[int | None],
        loans: list[Any],
        window: np.ndarray,
        pos: int,
        fingerprint: bytes | None,
    ) -> tuple[list[Placed], int, int | None]:
        """One part of ``into_window``: placed hits, the next free position, and the
        index of the first unknown-size hit that did not fit (None when all did)."""
        n = len(places)
        outs = [
            None if o is None or o == IN_POOL else window[o : o + self.sizes.get(k)]  # type: ignore[operator]
            for k, o in zip(part, places, strict=False)
        ]
        placed: list[Placed] = []
        for p in self.fetch(part[:n], start, fingerprint, loans[:n], outs, places):
            if p.offset is None:  # size was unknown: copy into the window if it fits
                size = p.header.nbytes
                if pos + size > window.nbytes:
                    return placed, pos, p.index
                np.copyto(window[pos : pos + size], host_array(p.payload))
                p = p._replace(offset=pos)
                pos += aligned(size)
            placed.append(p)
        return placed, pos, None

    def _part_end(self, keys: Sequence[str], start: int) -> int:
        """End of the part starting at ``start``: about PART_BYTES of known sizes."""
        total, end = 0, start
        while end < len(keys) and (end == start or total < PART_BYTES):
            total += self.sizes.get(keys[end]) or PART_BYTES // 16
            end += 1
        return end

    def _lent_hits(
        self,
        base: int,
        part: list[str],
        loans: list[Any],
        fingerprint: bytes | None,
        offsets: list[Any],
    ) -> list[Placed]:
        """The hits of a part the first tier lent whole: (header, payload) per key."""
        known = self.sizes.get
        out = []
        for i, (header, payload) in enumerate(loans):
            if fingerprint and header.fingerprint != fingerprint:
                continue
            if known(part[i]) is None:
                self.sizes.add(part[i], header.nbytes)
            out.append(Placed(base + i, header, offsets[i], payload))
        return out

    def _hits(
        self, base: int, got: list[Chunk | None], fingerprint: bytes | None, offsets: list[Any]
    ) -> list[Placed]:
        out = []
        for i, (chunk, offset) in enumerate(zip(got, offsets, strict=True)):
            if chunk is None or (fingerprint and chunk.header.fingerprint != fingerprint):
                continue
            self.sizes.add(chunk.key, chunk.header.nbytes)
            out.append(Placed(base + i, chunk.header, offset, chunk.payload))
        return out


def flat_buffers(payloads: list[Any]) -> list[Any]:
    """Buffers of ``payloads`` in order: a lent or reserved chunk's payload is a list of
    page views."""
    out: list[Any] = []
    for p in payloads:
        if isinstance(p, list):
            out += p
        else:
            out.append(p)
    return out
