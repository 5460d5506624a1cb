"""The one interface every storage medium implements, and the registry of media by name.

A backend stores chunk objects (``kvcore.chunk.Chunk``: header + payload) under their
keys. It does not judge them: the TieredStore verifies what comes back (key,
fingerprint, checksum) and tells the backend to ``delete`` a bad object. A backend only
reports objects it cannot even parse, as ``Corrupt``, having dropped them already.

Every call is batched, because the network and disk tiers pay per round trip.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from kvcore.chunk import Chunk


class Corrupt(NamedTuple):
    """An object found under ``key`` that is not a readable chunk; it has been dropped."""

    key: str
    reason: str


GetResult = Chunk | Corrupt | None
"""Per key: the chunk, a dropped unreadable object, or ``None`` (a plain miss)."""


class Usage(NamedTuple):
    """Occupancy of one backend; ``None`` where the medium cannot say (a shared server)."""

    items: int | None
    bytes_used: int | None
    bytes_capacity: int | None


EvictHook = Callable[[Chunk], None]
"""Called with a chunk just before a bounded tier reuses its space (write-back demotion)."""


class BackendUnavailable(RuntimeError):
    """The medium cannot run here (missing package or device); the message says what to do."""


class Backend(ABC):
    """A storage medium. Thread-safe: the store's executor calls it from several threads."""

    name: str = "backend"
    bounded: bool = False
    """True when the backend evicts to stay within a capacity (and calls ``on_evict``)."""

    on_evict: EvictHook | None = None

    parallel_io: bool = False
    """True when batches gain from being split across threads: the medium's reads and
    writes release the GIL (file I/O). False where per-chunk work is Python (parsing)."""

    networked: bool = False
    """True when calls cross the network to a server (redis, a kvstore daemon) and may
    take up to their deadline: the engine looks such tiers up off its loop."""

    def available(self) -> bool:
        """False while the medium is known to be unreachable (backing off after an
        error): calls then answer at once with misses."""
        return True

    @abstractmethod
    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Store each chunk under its key; per chunk, whether it is now stored.

        Storing a key that is already present is a success without rewriting it (keys
        name content). A failed write (full, unreachable) is ``False``, never an exception.
        """

    @abstractmethod
    def get(self, keys: Sequence[str], outs: Sequence[Any] | None = None) -> list[GetResult]:
        """Fetch chunks. With ``outs`` (a writable buffer or tensor per key, or None), each
        payload is read into the caller's buffer where the medium allows, and the
        returned chunk's payload views it. An unreachable medium returns misses."""

    @abstractmethod
    def contains(self, keys: Sequence[str]) -> int:
        """Length of the leading run of ``keys`` that are stored (stops at the first miss)."""

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> int:
        """Remove keys; returns how many were present."""

    @abstractmethod
    def usage(self) -> Usage:
        """Current occupancy."""

    @abstractmethod
    def close(self) -> None:
        """Release files, connections and memory. Idempotent."""

    def pin(self, keys: Sequence[str]) -> None:
        """Keep ``keys`` from eviction until ``unpin`` (no-op where nothing is evicted locally)."""
        return None

    def unpin(self, keys: Sequence[str]) -> None:
        """Undo one ``pin`` of each key."""
        return None


BackendFactory = Callable[..., Backend]

REGISTRY: dict[str, tuple[str, str, str | None]] = {
    # name: (module, class, pip extra that provides its optional dependency)
    "cpu": ("backends.cpu", "CPUBackend", None),
    "gpu": ("backends.gpu", "GPUBackend", "gpu"),
    "disk": ("backends.disk", "DiskBackend", None),
    "gds": ("backends.gds", "GDSBackend", "gpu"),
    "redis": ("backends.redis", "RedisBackend", None),
    "valkey": ("backends.redis", "RedisBackend", None),
    "remote": ("backends.remote", "RemoteBackend", None),
}
"""Backend name -> where its class lives. Modules import lazily, on first use."""


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``; a missing optional dependency says what to install."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module, cls, extra = REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'kvstore[{extra}]'" if extra else "pip install kvstore"
        raise BackendUnavailable(f"backend {name!r} needs {exc.name}: {hint}") from exc
    return getattr(mod, cls)


def create_backend(name: str, **kwargs: Any) -> Backend:
    """Instantiate backend ``name`` with its keyword arguments."""
    return backend_class(name)(**kwargs)
