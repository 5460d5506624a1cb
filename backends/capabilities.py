"""What some media can do beyond ``Backend`` (backends/base.py), declared as protocols so
the store asks ``isinstance`` instead of probing for methods by name.

Only the cpu (and gpu) pool has the first three: its chunks live in pages it can hand
out. Add a method here only when the store uses it and a medium implements it; a medium
has a capability by having the members (the protocols are structural).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from kvcore.chunk import ChunkHeader


@runtime_checkable
class Lends(Protocol):
    """Hits handed out in place, their pages pinned until the caller's ``unpin``."""

    @property
    def shared(self) -> Any:
        """The pool's SharedBuffer when it lives in shared memory, else None."""

    def lend(self, keys: Sequence[str]) -> list[tuple[ChunkHeader, list[Any]] | None]:
        """Each hit's header and the runs of the pool holding its payload."""

    def borrow(self, keys: Sequence[str]) -> list[tuple[ChunkHeader, list[Any]] | None]:
        """``lend``, with each payload as read-only views of the pool's pages."""


@runtime_checkable
class Reserves(Protocol):
    """Pages handed out for new chunks, filled by the caller, then published."""

    def reserve(self, headers: Sequence[ChunkHeader]) -> list[list[Any] | None]:
        """Writable page views per chunk; None where it is stored, being written, or
        finds no room."""

    def commit(self, headers: Sequence[ChunkHeader], ok: Sequence[bool]) -> list[bool]:
        """Publish the chunks whose ``ok`` is true, free the rest; whether each is stored."""


@runtime_checkable
class ChecksIntegrity(Protocol):
    """An invariant check of the medium's own bookkeeping."""

    def check_integrity(self) -> None:
        """Raise (with counts) if the medium's state is inconsistent."""


@runtime_checkable
class CountsEvictions(Protocol):
    """A medium that evicts, and counts the chunks it evicted."""

    evictions: int
