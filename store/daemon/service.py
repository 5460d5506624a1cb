"""What the daemon does, whatever the transport: checked requests against one TieredStore.

The gRPC API and the bulk stream are thin adapters over ``StoreService``. Every request
is checked whole before anything is stored (``BadRequest`` names the first problem), so
bad input never touches a stored chunk.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from kvcore.buffers import host_array
from kvcore.chunk import Chunk, ChunkError, ChunkHeader, checksum, decode_header, encode_prefix
from kvcore.keys import chunk_key
from store.metrics import TierStats
from store.tiered import TieredStore
from store.wire.put_frame import FIELDS, HASHES, HEADER, KEYS, NBYTES, OFFSETS, XXH3S

KEY = re.compile(r"(?:[0-9a-f]{16}\.)?[0-9a-f]{64}")  # fullmatch: "$" would let a "\n" in
HEX = re.compile(r"[0-9a-f]*")
KEY_LIST = re.compile(rf"{KEY.pattern}(?:,{KEY.pattern})*")  # keys joined by commas
KEY_FORMAT = "64 lowercase hex characters, optionally after a 16-hex salt tag and a dot"
IN_POOL = -1
"""``Placed.offset`` of a hit a client reads from its mapping of the shared pool."""
PART_BYTES = 4 << 20
"""A get is answered in parts of about this many payload bytes, so the client copies
one part out while the daemon fetches the next."""


class BadRequest(ValueError):
    """The request is malformed or over a limit: INVALID_ARGUMENT, nothing stored."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request bounds (``kvstore serve --max-batch`` ...)."""

    max_batch: int = 4096  # keys or chunks in one request
    max_chunk_bytes: int = 64 << 20  # payload of one chunk
    max_request_bytes: int = 256 << 20  # payload bytes of one put request

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_chunk_bytes", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class Placed(NamedTuple):
    """A hit of a get: the key's position in the request, its header, where its payload is
    (byte offset in the client's window, or None when it follows the frame inline)."""

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


class OverLimit(BadRequest):
    """A well-formed put over a limit; ``nbytes``: the payload bytes it declares (a stream
    reads and drops them to stay in step)."""

    def __init__(self, message: str, nbytes: int) -> None:
        super().__init__(message)
        self.nbytes = nbytes


class StoreService:
    """Checked lookup/put/get/delete/stats over ``store`` (which the caller owns)."""

    def __init__(self, store: TieredStore, limits: Limits | None = None) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.sizes = SizeIndex()
        self.prefixes = PrefixCache()

    # -- checks ---------------------------------------------------------------------
    def check_keys(self, keys: Any) -> list[str]:
        if not isinstance(keys, (list, tuple)) and not hasattr(keys, "__len__"):
            raise BadRequest("keys must be a list of strings")
        if len(keys) > self.limits.max_batch:
            raise BadRequest(f"{len(keys)} keys exceed the batch limit of {self.limits.max_batch}")
        keys = list(keys)
        # One regex pass over all keys at once (a per-key match cost ~1 µs, a tenth of
        # sending a 64 KiB hit); only a batch that fails is searched key by key. Salted
        # keys (kvcore/keys.py) take the second, slower pass.
        if not (
            all(type(k) is str and len(k) == 64 for k in keys) and HEX.fullmatch("".join(keys))
        ) and not self._salted_keys_ok(keys):
            for k in keys:
                if not isinstance(k, str) or not KEY.fullmatch(k):
                    raise BadRequest(f"malformed key {str(k)[:80]!r}: expected {KEY_FORMAT}")
        return keys

    @staticmethod
    def _salted_keys_ok(keys: list[Any]) -> bool:
        """One regex pass over keys joined by commas; a key holding a comma itself would
        join to the same text, so the commas are counted too."""
        if not all(type(k) is str for k in keys):
            return False
        joined = ",".join(keys)
        return joined.count(",") == len(keys) - 1 and KEY_LIST.fullmatch(joined) is not None

    def check_chunk(
        self, header_raw: Any, payload: Any, fingerprint: bytes | None, block_hash: bytes | None
    ) -> Chunk:
        """The chunk a put names, if it is well formed and intact; else BadRequest."""
        view = memoryview(payload).cast("B")
        header = self.check_header(header_raw, view.nbytes, fingerprint, block_hash)
        self.verify_payloads([header], [view])
        return Chunk(header, view)

    def check_header(
        self, header_raw: Any, nbytes: int, fingerprint: bytes | None, block_hash: Any
    ) -> ChunkHeader:
        """The header of a put chunk whose payload is ``nbytes`` long, if it is well formed,
        within the limits and names the request's fingerprint (and ``block_hash``, when
        given); else BadRequest. The payload's checksum is ``verify_payloads``' part, so a
        whole request's headers are checked before any payload byte is read."""
        if not isinstance(header_raw, (bytes, bytearray, memoryview)):
            raise BadRequest("a chunk header must be bytes")
        if block_hash is not None and not isinstance(block_hash, (bytes, bytearray)):
            raise BadRequest("a block hash must be bytes")
        try:
            header, _ = decode_header(bytes(header_raw))
        except (ChunkError, TypeError) as exc:
            raise BadRequest(f"unreadable chunk header: {exc}") from None
        key = header.key
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise BadRequest(f"malformed key {str(key)[:80]!r}: expected {KEY_FORMAT}")
        if header.nbytes > self.limits.max_chunk_bytes:
            raise BadRequest(
                f"chunk {key[:12]} of {header.nbytes} bytes exceeds the limit of {self.limits.max_chunk_bytes}"
            )
        if nbytes != header.nbytes:
            raise BadRequest(
                f"chunk {key[:12]}: payload is {nbytes} bytes, header says {header.nbytes}"
            )
        if fingerprint and header.fingerprint != fingerprint:
            raise BadRequest(f"chunk {key[:12]} names another model fingerprint than the request")
        if block_hash:
            self.check_block_hash(key, header.fingerprint, block_hash)
        return header

    @staticmethod
    def check_block_hash(key: str, fingerprint: bytes, block_hash: Any) -> None:
        """BadRequest unless ``key`` is ``chunk_key(fingerprint, block_hash)`` (after its
        salt tag, if any: the salt is in the block hash already)."""
        if not isinstance(block_hash, (bytes, bytearray)):
            raise BadRequest("a block hash must be bytes")
        if chunk_key(fingerprint, bytes(block_hash)) != key[-64:]:
            raise BadRequest(f"chunk {key[:12]}: key does not match its fingerprint and block hash")

    def check_groups(self, groups: list[list[Any]], fingerprint: bytes | None) -> list[ChunkHeader]:
        """The header of every chunk a put's groups name (store/wire/put_frame.py), once
        ``put_sizes`` has accepted them: each group's header checked by ``check_header``,
        its keys by one regex pass, its checksums by one range check; else BadRequest."""
        headers: list[ChunkHeader] = []
        for g in groups:
            keys, sums, hashes = g[KEYS], g[XXH3S], g[HASHES]
            if not keys:
                continue
            first = self.check_header(g[HEADER], g[NBYTES], fingerprint, None)
            if not (isinstance(sums, list) and len(sums) == len(keys)) or not (
                isinstance(hashes, list) and len(hashes) in (0, len(keys))
            ):
                raise BadRequest("a put group needs one xxh3 (and block hash, if any) per key")
            if keys[0] != first.key or sums[0] != first.checksum:
                raise BadRequest("a put group's header must be its first chunk's")
            self.check_keys(keys)
            if not all(type(x) is int for x in sums) or min(sums) < 0 or max(sums) >= 1 << 64:
                raise BadRequest("chunk checksums must be 64-bit unsigned integers")
            fp = first.fingerprint
            for k, block in zip(keys, hashes, strict=False):  # hashes: none or one per key
                self.check_block_hash(k, fp, block)
            rest = (first.dtype, first.shape, first.num_tokens, first.nbytes)
            tail = (first.layout, first.version)
            headers.append(first)
            headers += [
                ChunkHeader(k, fp, *rest, x, *tail) for k, x in zip(keys[1:], sums[1:], strict=True)
            ]
        return headers

    @staticmethod
    def verify_payloads(headers: Sequence[ChunkHeader], payloads: Sequence[Any]) -> None:
        """BadRequest unless each payload's xxh3 is its header's (sizes already checked).

        The one checksum pass over what the daemon stores: the cpu tier is not verified
        on reads (memory this process owns), so a chunk is hashed once, on arrival, while
        its bytes are still in the CPU caches."""
        for header, payload in zip(headers, payloads, strict=True):
            if checksum(payload) != header.checksum:  # a list: reserved pages, one per run
                raise BadRequest(f"chunk {header.key[:12]}: payload checksum mismatch")

    def check_put_size(self, count: int, nbytes: int) -> None:
        if count > self.limits.max_batch:
            raise BadRequest(f"{count} chunks exceed the batch limit of {self.limits.max_batch}")
        if nbytes > self.limits.max_request_bytes:
            raise BadRequest(
                f"put of {nbytes} payload bytes exceeds the request limit of {self.limits.max_request_bytes}"
            )

    def put_sizes(self, groups: Any, region: bool = False) -> list[int]:
        """The payload size of each chunk a put's groups (store/wire/put_frame.py) name, in
        order. BadRequest if the groups are malformed (``region``: with offsets),
        OverLimit if they name too many chunks or bytes (checked before the list of sizes
        is built: a frame of a few MiB can name millions of chunks)."""
        width = FIELDS + region
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and len(g) >= width and isinstance(g[KEYS], list) for g in groups
        ):
            raise BadRequest("put needs chunks: [[header, nbytes, keys, xxh3s, hashes], ...]")
        for g in groups:
            n = g[NBYTES]
            if type(n) is not int or n < 0:
                raise BadRequest("chunk sizes must be non-negative integers")
            if region and not (isinstance(g[OFFSETS], list) and len(g[OFFSETS]) == len(g[KEYS])):
                raise BadRequest("a region put needs one payload offset per chunk")
        nbytes = sum(g[NBYTES] * len(g[KEYS]) for g in groups)
        try:
            self.check_put_size(sum(len(g[KEYS]) for g in groups), nbytes)
        except BadRequest as exc:
            raise OverLimit(str(exc), nbytes) from None
        return [g[NBYTES] for g in groups for _ in g[KEYS]]

    # -- operations -----------------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> list[str]:
        """The tier of each leading stored key."""
        return self.store.locate(self.check_keys(keys))

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Store already-checked chunks; per chunk, whether some tier holds it now."""
        for c in chunks:
            self.sizes.add(c.key, c.header.nbytes)
        result = self.store.put(chunks)
        stored = getattr(result, "stored", None)  # PutResult: per chunk
        if stored is not None:
            return list(stored)
        if result == len(chunks):
            return [True] * len(chunks)
        return [self.store.lookup([c.key]) == 1 for c in chunks]  # rare: a tier refused some

    def delete(self, keys: Sequence[str]) -> int:
        return self.store.delete(self.check_keys(keys))

    def stats(self) -> dict[str, TierStats]:
        return self.store.stats()

    def get_parts(self, keys: Sequence[str], fingerprint: bytes | None) -> Iterator[list[Placed]]:
        """Hits of ``keys`` in parts of about PART_BYTES, payloads in fresh buffers."""
        keys = self.check_keys(keys)
        start = 0
        while start < len(keys):
            end = self._part_end(keys, start)
            got = self.store.get(keys[start:end])
            yield self._hits(start, got, fingerprint, [None] * (end - start))
            start = end

    def plan_parts(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        """``[start, end)`` of each part of a get of ``keys`` (about PART_BYTES each)."""
        parts, start = [], 0
        while start < len(keys):
            end = self._part_end(keys, start)
            parts.append((start, end))
            start = end
        return parts

    def fetch_part(
        self,
        keys: Sequence[str],
        span: tuple[int, int],
        fingerprint: bytes | None,
        buffer: Callable[[int], np.ndarray],
    ) -> tuple[list[Placed], list[str]]:
        """Hits of ``keys[start:end]`` and the keys lent by the first tier.

        Hits the first tier can lend (``TieredStore.borrow``) come as lists of read-only
        views of its pages, pinned: the caller sends them and then ``store.give_back``s
        the lent keys (always, even when it sends nothing). Other payloads of keys of
        known size land back to back in ``buffer(nbytes)`` (a caller's reused staging
        buffer), the rest in fresh buffers."""
        start, end = span
        part = keys[start:end]
        lent = self.store.borrow(part)
        lent_keys = [k for k, item in zip(part, lent, strict=True) if item is not None]
        try:
            rest = [i for i, x in enumerate(lent) if x is None]
            if not rest:  # all lent: the common case of a hot cache, without the detours
                return self._lent_hits(start, part, lent, fingerprint), lent_keys
            got: list[Chunk | None] = [None if x is None else Chunk(x[0], x[1]) for x in lent]
            if rest:
                sizes = [self.sizes.get(part[i]) for i in rest]
                buf = buffer(sum(_aligned(n) for n in sizes if n is not None))
                outs: list[np.ndarray | None] = []
                pos = 0
                for n in sizes:
                    outs.append(None if n is None else buf[pos : pos + n])
                    pos += 0 if n is None else _aligned(n)
                for i, chunk in zip(
                    rest, self.store.get([part[i] for i in rest], outs), strict=True
                ):
                    got[i] = chunk
            return self._hits(start, got, fingerprint, [None] * len(part)), lent_keys
        except BaseException:
            self.store.give_back(lent_keys)
            raise

    def get_into(
        self,
        keys: Sequence[str],
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
        keys = self.check_keys(keys)
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
                    pos += _aligned(size or 0)
                placed, pos, stop = self._fetch_into(
                    keys, start, places, loans, window, pos, fingerprint
                )
                cut = start + len(places) if stop is None else stop
            finally:  # lent hits past the cut were not placed: their pins go now
                kept = cut - start
                late = [
                    k for k, loan in zip(part[kept:], loans[kept:], strict=True) if loan is not None
                ]
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
        keys: list[str],
        start: int,
        places: list[int | None],
        loans: list[Any],
        window: np.ndarray,
        pos: int,
        fingerprint: bytes | None,
    ) -> tuple[list[Placed], int, int | None]:
        """One part of ``get_into``: placed hits, the next free position, and the index of
        the first unknown-size hit that did not fit (None when all did)."""
        part = keys[start : start + len(places)]
        got: list[Chunk | None] = [None] * len(places)
        fetch = [i for i, o in enumerate(places) if o != IN_POOL]
        outs = [
            None if places[i] is None else window[places[i] : places[i] + self.sizes.get(part[i])]  # type: ignore[operator]
            for i in fetch
        ]
        for i, chunk in zip(fetch, self.store.get([part[i] for i in fetch], outs), strict=True):
            got[i] = chunk
        for i, o in enumerate(places):
            if o == IN_POOL:
                got[i] = Chunk(loans[i][0], loans[i][1])  # payload: the runs in the pool
        placed: list[Placed] = []
        for p in self._hits(start, got, fingerprint, places):
            if p.offset is None:  # size was unknown: copy into the window if it fits
                n = p.header.nbytes
                if pos + n > window.nbytes:
                    return placed, pos, p.index
                np.copyto(window[pos : pos + n], host_array(p.payload))
                p = p._replace(offset=pos)
                pos += _aligned(n)
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
        self, base: int, part: list[str], lent: list[Any], fingerprint: bytes | None
    ) -> list[Placed]:
        """``_hits`` of a part the first tier lent whole: (header, views) per key."""
        known = self.sizes.get
        out = []
        for i, (header, views) in enumerate(lent):
            if fingerprint and header.fingerprint != fingerprint:
                continue
            if known(part[i]) is None:
                self.sizes.add(part[i], header.nbytes)
            out.append(Placed(base + i, header, None, views))
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


def _aligned(n: int) -> int:
    """Payloads start on 64-byte boundaries in a window (cache lines, aligned copies)."""
    return -(-n // 64) * 64
