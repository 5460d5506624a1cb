"""Every check of what a request names, before the store sees it: keys, chunk headers,
payload checksums, put groups and sizes against the daemon's limits.

Why one place: the stream, the shared-memory paths and gRPC all take keys and chunks
from strangers, and a check written per transport is a check one transport forgets.
``BadRequest`` (INVALID_ARGUMENT) names the first problem; nothing of a refused request
is stored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any

from kvcore.chunk import Chunk, ChunkError, ChunkHeader, checksum, decode_header
from kvcore.keys import chunk_key
from store.wire.constants import MAX_BATCH, MAX_CHUNK_BYTES, MAX_REQUEST_BYTES
from store.wire.messages import BadRequest, Put
from store.wire.put_frame import HASHES, HEADER, KEYS, NBYTES, XXH3S

__all__ = ["KEY", "KEY_FORMAT", "BadRequest", "Limits", "OverLimit", "RequestChecks"]

KEY = re.compile(r"(?:[0-9a-f]{16}\.)?[0-9a-f]{64}")  # fullmatch: "$" would let a "\n" in
HEX = re.compile(r"[0-9a-f]*")
KEY_LIST = re.compile(rf"{KEY.pattern}(?:,{KEY.pattern})*")  # keys joined by commas
KEY_FORMAT = "64 lowercase hex characters, optionally after a 16-hex salt tag and a dot"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request bounds (``kvstore serve --max-batch`` ...)."""

    max_batch: int = MAX_BATCH  # keys or chunks in one request
    max_chunk_bytes: int = MAX_CHUNK_BYTES  # payload of one chunk
    max_request_bytes: int = MAX_REQUEST_BYTES  # payload bytes of one put request

    def __post_init__(self) -> None:
        for name, value in (
            ("max_batch", self.max_batch),
            ("max_chunk_bytes", self.max_chunk_bytes),
            ("max_request_bytes", self.max_request_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")


class OverLimit(BadRequest):
    """A well-formed put over a limit; ``nbytes``: the payload bytes it declares (a stream
    reads and drops them to stay in step)."""

    def __init__(self, message: str, nbytes: int) -> None:
        super().__init__(message)
        self.nbytes = nbytes


def verify_payloads(headers: Sequence[ChunkHeader], payloads: Sequence[Any]) -> None:
    """BadRequest unless each payload's xxh3 is its header's (sizes already checked).

    The one checksum pass over what the daemon stores: the cpu tier is not verified on
    reads (memory this process owns), so a chunk is hashed once, on arrival, while its
    bytes are still in the CPU caches."""
    for header, payload in zip(headers, payloads, strict=True):
        if checksum(payload) != header.checksum:  # a list: reserved pages, one per run
            raise BadRequest(f"chunk {header.key[:12]}: payload checksum mismatch")


def check_block_hash(key: str, fingerprint: bytes, block_hash: Any) -> None:
    """BadRequest unless ``key`` is ``chunk_key(fingerprint, block_hash)`` (after its salt
    tag, if any: the salt is in the block hash already)."""
    if not isinstance(block_hash, (bytes, bytearray)):
        raise BadRequest("a block hash must be bytes")
    if chunk_key(fingerprint, bytes(block_hash)) != key[-64:]:
        raise BadRequest(f"chunk {key[:12]}: key does not match its fingerprint and block hash")


class RequestChecks:
    """The checks, against ``limits``; StoreService is one."""

    limits: Limits
    verify_payloads = staticmethod(verify_payloads)
    check_block_hash = staticmethod(check_block_hash)

    def check_keys(self, keys: Any) -> list[str]:
        if not isinstance(keys, Sized):
            raise BadRequest("keys must be a list of strings")
        if len(keys) > self.limits.max_batch:
            raise BadRequest(f"{len(keys)} keys exceed the batch limit of {self.limits.max_batch}")
        keys = list(keys)
        # One regex pass over all keys at once (a per-key match cost ~1 µs, a tenth of
        # sending a 64 KiB hit); only a batch that fails is searched key by key. Salted
        # keys (kvcore/keys.py) take the second, slower pass.
        if not (
            all(type(k) is str and len(k) == 64 for k in keys) and HEX.fullmatch("".join(keys))
        ) and not _salted_keys_ok(keys):
            for k in keys:
                if not isinstance(k, str) or not KEY.fullmatch(k):
                    raise BadRequest(f"malformed key {str(k)[:80]!r}: expected {KEY_FORMAT}")
        return keys

    def check_chunk(
        self, header_raw: Any, payload: Any, fingerprint: bytes | None, block_hash: bytes | None
    ) -> Chunk:
        """The chunk a put names, if it is well formed and intact; else BadRequest."""
        view = memoryview(payload).cast("B")
        header = self.check_header(header_raw, view.nbytes, fingerprint, block_hash)
        verify_payloads([header], [view])
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
        limit = self.limits.max_chunk_bytes
        if header.nbytes > limit:
            raise BadRequest(
                f"chunk {key[:12]} of {header.nbytes} bytes exceeds the limit of {limit}"
            )
        if nbytes != header.nbytes:
            raise BadRequest(
                f"chunk {key[:12]}: payload is {nbytes} bytes, header says {header.nbytes}"
            )
        if fingerprint and header.fingerprint != fingerprint:
            raise BadRequest(f"chunk {key[:12]} names another model fingerprint than the request")
        if block_hash:
            check_block_hash(key, header.fingerprint, block_hash)
        return header

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
                check_block_hash(k, fp, block)
            rest = (first.dtype, first.shape, first.num_tokens, first.nbytes)
            tail = (first.layout, first.version)
            headers.append(first)
            headers += [
                ChunkHeader(k, fp, *rest, x, *tail) for k, x in zip(keys[1:], sums[1:], strict=True)
            ]
        return headers

    def check_put_size(self, count: int, nbytes: int) -> None:
        if count > self.limits.max_batch:
            raise BadRequest(f"{count} chunks exceed the batch limit of {self.limits.max_batch}")
        if nbytes > self.limits.max_request_bytes:
            raise BadRequest(
                f"put of {nbytes} payload bytes exceeds the request limit of "
                f"{self.limits.max_request_bytes}"
            )

    def put_sizes(self, put: Put) -> list[int]:
        """The payload size of each chunk of ``put`` (its groups well formed: Put.from_wire),
        in order. OverLimit if they name too many chunks or bytes (checked before the list
        of sizes is built: a frame of a few MiB can name millions of chunks)."""
        groups = put.chunks
        nbytes = sum(g[NBYTES] * len(g[KEYS]) for g in groups)
        try:
            self.check_put_size(sum(len(g[KEYS]) for g in groups), nbytes)
        except BadRequest as exc:
            raise OverLimit(str(exc), nbytes) from None
        return [g[NBYTES] for g in groups for _ in g[KEYS]]


def _salted_keys_ok(keys: list[Any]) -> bool:
    """One regex pass over keys joined by commas; a key holding a comma itself would join
    to the same text, so the commas are counted too."""
    if not all(type(k) is str for k in keys):
        return False
    joined = ",".join(keys)
    return joined.count(",") == len(keys) - 1 and KEY_LIST.fullmatch(joined) is not None
