"""The stream protocol's messages, typed: one class per frame, for both ends.

Why: both ends used to build and pick apart untyped msgpack dicts, each in its own
words, so a field renamed on one side broke the other silently. ``to_wire()`` is the
exact dict sent (keys in the order sent: msgpack keeps it, so the bytes are unchanged);
``from_wire(d)`` checks what a peer sent, raising ``BadRequest`` (INVALID_ARGUMENT,
with the daemon's message) for what it cannot serve.

Messages are per request, never per chunk: per-chunk columns (a get's keys, a put's
groups of store/wire/put_frame.py, a part's rows) stay plain lists, checked where they
are used (store/daemon/checks.py). docs/daemon.md lists the ops and their frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from store.wire.put_frame import FIELDS, KEYS, NBYTES, OFFSETS
from store.wire.shm import NONCE_BYTES
from store.wire.stream import StreamClosed


class BadRequest(ValueError):
    """The request is malformed or over a limit: INVALID_ARGUMENT, nothing stored."""


# -- session ----------------------------------------------------------------------------
@dataclass(slots=True)
class Hello:
    """The first frame of every connection: the bearer token and the client's name."""

    token: str | bytes | None
    client: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"op": "hello", "token": self.token, "client": self.client}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Hello:
        token, client = d.get("token"), d.get("client")
        return cls(
            token if isinstance(token, (str, bytes)) else None, str(client) if client else ""
        )


@dataclass(slots=True)
class HelloReply:
    """The daemon's limits, which a client splits its puts by (0: not stated)."""

    version: int
    max_batch: int = 0
    max_chunk_bytes: int = 0
    max_request_bytes: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "ok": True,
            "version": self.version,
            "max_batch": self.max_batch,
            "max_chunk_bytes": self.max_chunk_bytes,
            "max_request_bytes": self.max_request_bytes,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> HelloReply:
        def positive(name: str) -> int:
            v = d.get(name)
            return v if type(v) is int and v > 0 else 0

        names = ("max_batch", "max_chunk_bytes", "max_request_bytes")
        return cls(d.get("version", 0), *(positive(name) for name in names))

    def limits(self) -> dict[str, int]:
        """The put limits the daemon stated (none: empty)."""
        stated = {"max_batch": self.max_batch, "max_request_bytes": self.max_request_bytes}
        return {k: v for k, v in stated.items() if v}


@dataclass(slots=True)
class Attach:
    """A client's shared-memory region (store/wire/shm.py): its name, the nonce at its
    start, and the address where the client has it mapped (for the cma probe)."""

    name: Any  # checked by RegionFile.attach, which names what is wrong
    nonce: bytes | None  # None: not bytes, so it matches no region
    at: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"op": "attach", "name": self.name, "nonce": self.nonce, "at": self.at}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Attach:
        nonce, at = d.get("nonce") or b"", d.get("at")
        ok = isinstance(nonce, (bytes, bytearray))
        return cls(d.get("name"), bytes(nonce) if ok else None, at if type(at) is int else None)


NONCE_MISMATCH = "region nonce does not match: not the same host or not this client's"


@dataclass(slots=True)
class AttachReply:
    """The region is attached; ``door``: the same-host door's offer (same_host.py)."""

    size: int
    door: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ok": True, "size": self.size}
        if self.door is not None:
            d["door"] = self.door
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> AttachReply:
        door = d.get("door")
        return cls(d.get("size", 0), door if isinstance(door, dict) else None)


@dataclass(slots=True)
class Cma:
    """May puts on this connection be read from the client's memory (cma.py)?"""

    def to_wire(self) -> dict[str, Any]:
        return {"op": "cma"}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Cma:
        return cls()


@dataclass(slots=True)
class CmaReply:
    allowed: bool

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "cma": self.allowed}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CmaReply:
        return cls(bool(d.get("cma")))


@dataclass(slots=True)
class Ucx:
    """Move the connection onto UCX: the client's worker address (ucx_transport.py)."""

    address: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"op": "ucx", "address": self.address}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Ucx:
        address = d.get("address")
        if not isinstance(address, (bytes, bytearray)) or not address:
            raise BadRequest("ucx needs the client's worker address (bytes)")
        return cls(bytes(address))


@dataclass(slots=True)
class UcxReply:
    """On the socket: the daemon's worker address. Then over UCX: ``ready``."""

    address: bytes | None = None  # None: the ``ready`` frame, the first over UCX

    def to_wire(self) -> dict[str, Any]:
        if self.address is None:
            return {"ok": True, "ucx": True}
        return {"ok": True, "address": self.address}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> UcxReply:
        if d.get("ucx"):
            return cls(None)
        address = d.get("address")
        if not isinstance(address, (bytes, bytearray)) or not address:
            raise StreamClosed("daemon sent no UCX worker address")
        return cls(bytes(address))


# -- get --------------------------------------------------------------------------------
@dataclass(slots=True)
class Get:
    """Chunks of ``keys`` (of model ``fp``, if given). With ``region``, payloads go to
    the window ``offset, length`` of the client's region, or stay in the shared pool
    (``pool``: the client maps it) until it sends ``release``."""

    keys: list[Any]  # checked by store/daemon/checks.py: one regex pass
    fp: bytes | None = None
    region: bool = False
    offset: Any = None  # checked against the region: check_window
    length: Any = None
    pool: bool = False

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": "get", "keys": self.keys, "fp": self.fp}
        if self.region:
            d.update(region=True, offset=self.offset, length=self.length, pool=self.pool)
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Get:
        keys = d.get("keys")
        if not isinstance(keys, list):
            raise BadRequest("keys must be a list of strings")
        fp, region = d.get("fp") or None, bool(d.get("region"))
        return cls(keys, fp, region, d.get("offset"), d.get("length"), bool(d.get("pool")))


def check_window(offset: Any, length: Any, size: int) -> tuple[int, int]:
    """The window ``offset, length`` a region request names in a region of ``size``."""
    if not (type(offset) is int and type(length) is int):
        raise BadRequest("region requests need integer offset and length")
    if offset < NONCE_BYTES or length < 0 or offset + length > size:
        raise BadRequest(f"window {offset}+{length} is outside the region of {size}")
    return offset, length


@dataclass(slots=True)
class Part:
    """Hits of a get, one row each (a list, as sent): ``[index, header]`` (payloads
    follow on the stream), ``[index, header, offset]`` (in the window) or
    ``[index, header, IN_POOL, runs]`` (in the shared pool)."""

    rows: list[list[Any]]

    def to_wire(self) -> dict[str, Any]:
        return {"part": self.rows}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Part:
        rows = d["part"]
        if not isinstance(rows, list):
            raise StreamClosed("daemon sent a part that is not a list of rows")
        return cls(rows)


@dataclass(slots=True)
class GetDone:
    """A get's last frame: how many keys it handled (a region get may stop short: the
    client asks again for the rest), and whether the client must ``release`` pool pages."""

    done: int
    release: bool | None = None  # None: a socket get, which names no release

    def to_wire(self) -> dict[str, Any]:
        if self.release is None:
            return {"ok": True, "done": self.done}
        return {"ok": True, "done": self.done, "release": self.release}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> GetDone:
        return cls(d.get("done", 0), bool(d.get("release")))


@dataclass(slots=True)
class Release:
    """The client copied a get's pool runs out (``released``: the daemon's answer, sent
    while the pages were still pinned)."""

    released: bool = False

    def to_wire(self) -> dict[str, Any]:
        if self.released:
            return {"ok": True, "released": True}
        return {"op": "release"}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Release:
        """The client's release; anything else on the stream then is out of step."""
        if d.get("op") != "release":
            raise StreamClosed(f"expected release of lent pool pages, got {d.get('op')!r}")
        return cls()


# -- put --------------------------------------------------------------------------------
PUT_SHAPE = "put needs chunks: [[header, nbytes, keys, xxh3s, hashes], ...]"


@dataclass(slots=True)
class Put:
    """Chunks in groups (store/wire/put_frame.py), of model ``fp``. Payloads follow on
    the stream, or lie in the client's region (``region``: each group has offsets in
    the window ``offset, length``), or in its memory (``cma``: one address per chunk,
    checked once the connection may be read: store/daemon/put_path.py)."""

    chunks: list[list[Any]]
    fp: bytes | None = None
    region: bool = False
    offset: Any = None
    length: Any = None
    cma: Any = None

    @property
    def inline(self) -> bool:
        """Whether the payload bytes follow on the stream."""
        return not self.region and self.cma is None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": "put", "fp": self.fp, "chunks": self.chunks}
        if self.cma is not None:
            d["cma"] = self.cma
        elif self.region:
            d.update(region=True, offset=self.offset, length=self.length)
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Put:
        """The put ``d`` names, its groups well formed (sizes against the limits, headers
        and keys are store/daemon/checks.py's)."""
        groups, region = d.get("chunks"), bool(d.get("region"))
        width = FIELDS + region
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and len(g) >= width and isinstance(g[KEYS], list) for g in groups
        ):
            raise BadRequest(PUT_SHAPE)
        for g in groups:
            n = g[NBYTES]
            if type(n) is not int or n < 0:
                raise BadRequest("chunk sizes must be non-negative integers")
            if region and not (isinstance(g[OFFSETS], list) and len(g[OFFSETS]) == len(g[KEYS])):
                raise BadRequest("a region put needs one payload offset per chunk")
        fp = d.get("fp") or None
        return cls(groups, fp, region, d.get("offset"), d.get("length"), d.get("cma"))


@dataclass(slots=True)
class PutReply:
    """Per chunk of a put, whether the daemon holds it now."""

    stored: list[bool]

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "stored": self.stored}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PutReply:
        return cls(list(d["stored"]))


# -- errors -----------------------------------------------------------------------------
@dataclass(slots=True)
class Error:
    """An error frame: ``code`` is a gRPC status name (check_reply raises RemoteError)."""

    code: str
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Error:
        return cls(str(d["error"]), str(d.get("message", "")))
