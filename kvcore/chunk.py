"""The chunk object: one self-describing, checksummed unit of KV that every tier stores.

Wire and file layout (little endian)::

    | magic "KVCK" | u32 header_len | u32 payload_offset | msgpack header | pad | payload |
    0              4                8                    12                     payload_offset

The header carries the format version, the chunk key, the model fingerprint digest,
dtype, shape, token count, layout, payload size and the xxh3-64 of the payload. The
payload is ``[layers, 2, tokens, kv_heads, head_dim]``, layer-major, so one layer is a
contiguous slice. ``payload_offset`` lets the disk tier pad the header to a page so the
payload can be read with O_DIRECT straight into an aligned buffer; network tiers use no
padding. Header and payload always travel as one object (never two keys), so a reader
can never pair a header with another chunk's payload.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np
import xxhash

FORMAT_VERSION = 1
MAGIC = b"KVCK"
_PREFIX = struct.Struct("<4sII")
PREFIX_SIZE = _PREFIX.size  # 12
HEADER_READ_SIZE = 4096
"""Bytes a reader fetches first: the prefix and header always fit (keys are 64 hex chars)."""


class ChunkError(Exception):
    """A stored object is not the chunk asked for: corrupt, truncated or foreign. A miss."""


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """Metadata of one chunk; ``checksum`` is the xxh3-64 of the payload bytes."""

    key: str
    fingerprint: bytes
    dtype: str
    shape: tuple[int, ...]
    num_tokens: int
    nbytes: int
    checksum: int
    layout: str = "LTHD"
    version: int = FORMAT_VERSION

    def to_msgpack(self) -> bytes:
        return msgpack.packb(
            {
                "v": self.version,
                "key": self.key,
                "fp": self.fingerprint,
                "dtype": self.dtype,
                "shape": list(self.shape),
                "tokens": self.num_tokens,
                "nbytes": self.nbytes,
                "xxh3": self.checksum,
                "layout": self.layout,
            }
        )

    @classmethod
    def from_msgpack(cls, raw: bytes | memoryview) -> ChunkHeader:
        try:
            d = msgpack.unpackb(raw)
            if d["v"] != FORMAT_VERSION:
                raise ChunkError(f"unsupported chunk format version {d['v']}")
            return cls(  # positional: a daemon parses one per chunk put, keywords cost 25%
                d["key"],
                d["fp"],
                d["dtype"],
                tuple(d["shape"]),
                d["tokens"],
                d["nbytes"],
                d["xxh3"],
                d["layout"],
                d["v"],
            )
        except ChunkError:
            raise
        except Exception as exc:  # msgpack raises many types on garbage
            raise ChunkError(f"unreadable chunk header: {exc}") from exc


class Chunk(NamedTuple):
    """A header and its payload bytes (a host memoryview, or a uint8 torch tensor on a device)."""

    header: ChunkHeader
    payload: Any

    @property
    def key(self) -> str:
        return self.header.key


class CheckedChunk(Chunk):
    """A chunk whose reader hashed the payload against ``header.checksum`` as it landed.

    Why: a tier read verified later, batch by batch, hashes bytes that have left the CPU
    caches; hashing each payload right after its read costs about a third as much at
    64 KiB. ``verify`` trusts this mark for the checksum (it still checks key and
    fingerprint). Made only by ``checked``, after a matching hash.
    """

    __slots__ = ()


class Prefix(NamedTuple):
    """The fixed-size start of an encoded chunk."""

    header_len: int
    payload_offset: int


def on_device(buf: Any) -> bool:
    """True for a torch tensor in device memory (numpy arrays also have ``.device``)."""
    return type(buf).__name__ == "Tensor" and buf.device.type != "cpu"


def host_view(buf: Any) -> memoryview:
    """``as_bytes_view`` of ``buf``, copying it to the host first if it is on a device."""
    return as_bytes_view(buf.cpu() if on_device(buf) else buf)


def checksum(payload: Any) -> int:
    """xxh3-64 of a host buffer (memoryview, bytes, numpy array), or of the bytes of a
    list of them back to back (a payload held in several runs of pool pages)."""
    if isinstance(payload, list):
        if len(payload) == 1:  # one run of pages: the common case, without a digest object
            return xxhash.xxh3_64_intdigest(payload[0])
        digest = xxhash.xxh3_64()
        for part in payload:
            digest.update(part)
        return digest.intdigest()
    return xxhash.xxh3_64_intdigest(payload)


def check_payload(header: ChunkHeader, payload: Any) -> None:
    """Raise ChunkError unless host buffer ``payload`` is the header's size and xxh3."""
    n = payload.nbytes if hasattr(payload, "nbytes") else len(payload)
    if n != header.nbytes:
        raise ChunkError(
            f"chunk {header.key[:12]} payload is {n} bytes, header says {header.nbytes}"
        )
    if checksum(payload) != header.checksum:
        raise ChunkError(f"chunk {header.key[:12]} checksum mismatch")


def checked(header: ChunkHeader, payload: Any) -> CheckedChunk:
    """``payload`` (a flat host array or byte view: it has ``nbytes``) under ``header``,
    once its size and xxh3 match; raises ChunkError otherwise."""
    if payload.nbytes != header.nbytes or xxhash.xxh3_64_intdigest(payload) != header.checksum:
        check_payload(header, payload)  # raises, saying which
    return CheckedChunk(header, payload)


def as_bytes_view(data: Any) -> memoryview:
    """A flat uint8 memoryview over a contiguous host buffer, numpy array or CPU tensor."""
    if hasattr(data, "detach"):  # torch.Tensor: view as bytes without numpy's dtype limits
        import torch

        data = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")


def make_chunk(
    key: str,
    fingerprint: bytes,
    kv: Any,
    num_tokens: int,
    *,
    dtype: str | None = None,
    layout: str = "LTHD",
) -> Chunk:
    """Build a chunk from ``kv`` shaped ``[layers, 2, tokens, kv_heads, head_dim]``."""
    shape = tuple(int(s) for s in kv.shape)
    if dtype is None:
        dtype = str(kv.dtype).removeprefix("torch.")
    payload = as_bytes_view(kv)
    header = ChunkHeader(
        key, fingerprint, dtype, shape, num_tokens, payload.nbytes, checksum(payload), layout
    )
    return Chunk(header, payload)


def encode_prefix(header: ChunkHeader, align: int = 0) -> bytes:
    """The bytes before the payload: prefix, header and, with ``align``, zero padding."""
    raw = header.to_msgpack()
    offset = PREFIX_SIZE + len(raw)
    if align:
        offset = -(-offset // align) * align
    out = bytearray(offset)
    _PREFIX.pack_into(out, 0, MAGIC, len(raw), offset)
    out[PREFIX_SIZE : PREFIX_SIZE + len(raw)] = raw
    return bytes(out)


def decode_prefix(buf: bytes | memoryview) -> Prefix:
    """Parse the fixed prefix; raises ChunkError on a foreign or truncated object."""
    if len(buf) < PREFIX_SIZE:
        raise ChunkError(f"object of {len(buf)} bytes is shorter than a chunk prefix")
    magic, header_len, offset = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC or offset < PREFIX_SIZE + header_len:
        raise ChunkError("not a chunk object (bad magic or offsets)")
    return Prefix(header_len, offset)


def decode_header(buf: bytes | memoryview) -> tuple[ChunkHeader, int]:
    """Header and payload offset from the start of an encoded chunk."""
    pre = decode_prefix(buf)
    end = PREFIX_SIZE + pre.header_len
    if len(buf) < end:
        raise ChunkError("chunk header truncated")
    return ChunkHeader.from_msgpack(memoryview(buf)[PREFIX_SIZE:end]), pre.payload_offset


class HeaderCache:
    """The header of each recently read or written key, so a read need not parse it.

    Why: parsing a header (msgpack, then a frozen dataclass) takes ~3.5 µs, a fifth of a
    64 KiB page-cache read, and a tier reads the same chunks again and again.

    ``decode(key, buf)`` reuses the header parsed last time for ``key`` only if ``buf``
    starts with exactly the same prefix and header bytes (a ``startswith``, no copy):
    equal bytes parse to the same immutable header, so that is exact, never stale.
    ``known(key)`` returns a header remembered from this process's own write or an
    earlier read of the key: a reader that trusts it for the payload's size and xxh3
    need not read the stored header at all (keys name content, so an object stored
    under a key never changes while the tier holds it; the tier ``forget``s a dropped
    key). Bounded: the whole map is dropped when it reaches ``limit`` entries.
    Thread-safe (a lookup, a store or a rebinding per call).
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._seen: dict[str, tuple[bytes | None, tuple[ChunkHeader, int]]] = {}

    def known(self, key: str) -> tuple[ChunkHeader, int] | None:
        """The remembered header and payload offset of ``key``, if any."""
        hit = self._seen.get(key)
        return None if hit is None else hit[1]

    def remember(
        self, key: str, header: ChunkHeader, offset: int, raw: bytes | None = None
    ) -> None:
        """Remember ``key``'s header (``raw``: its encoded prefix and header bytes)."""
        if len(self._seen) >= self.limit:
            self._seen = {}
        self._seen[key] = (raw, (header, offset))

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)

    def decode(self, key: str, buf: bytes | bytearray) -> tuple[ChunkHeader, int]:
        """Header and payload offset of the object in ``buf`` (read for ``key``), like
        ``decode_header``; ChunkError if it is not a chunk."""
        hit = self._seen.get(key)
        if hit is not None and hit[0] is not None and buf.startswith(hit[0]):
            return hit[1]
        header, offset = decode_header(buf)
        raw = bytes(buf[: PREFIX_SIZE + _PREFIX.unpack_from(buf, 0)[1]])
        self.remember(key, header, offset, raw)
        return header, offset


def decode(buf: bytes | memoryview) -> Chunk:
    """A chunk viewing ``buf`` (zero copy). Raises ChunkError if the object is truncated."""
    header, offset = decode_header(buf)
    payload = memoryview(buf)[offset:]
    if payload.nbytes != header.nbytes:
        raise ChunkError(f"payload is {payload.nbytes} bytes, header says {header.nbytes}")
    return Chunk(header, payload)


def encode(chunk: Chunk) -> bytes:
    """The whole object as one bytes value (network tiers)."""
    return encode_prefix(chunk.header) + host_view(chunk.payload)


def verify(chunk: Chunk, key: str, fingerprint: bytes | None = None) -> None:
    """Raise ChunkError unless ``chunk`` is exactly the chunk named ``key``, intact.

    The key and fingerprint checks catch a tier that returns another object than asked
    for; the checksum catches bit flips and torn writes.
    """
    h = chunk.header
    if h.key != key:
        raise ChunkError(f"asked for chunk {key[:12]}, object holds {h.key[:12]}")
    if fingerprint is not None and h.fingerprint != fingerprint:
        raise ChunkError(f"chunk {key[:12]} was written by another model fingerprint")
    if not isinstance(chunk, CheckedChunk):  # else hashed by its reader already
        check_payload(h, host_view(chunk.payload))


def to_tensor(chunk: Chunk):
    """The payload as a torch tensor of the header's dtype and shape (zero copy on host)."""
    import torch

    dtype = getattr(torch, chunk.header.dtype)
    payload = chunk.payload
    if not isinstance(payload, torch.Tensor):
        view = as_bytes_view(payload)
        if not view.nbytes:
            payload = torch.empty(0, dtype=torch.uint8)
        else:
            with warnings.catch_warnings():  # bytes from a network read: nobody else holds them
                warnings.simplefilter("ignore", UserWarning)
                payload = torch.frombuffer(view, dtype=torch.uint8)
    return payload.view(dtype).view(chunk.header.shape)
