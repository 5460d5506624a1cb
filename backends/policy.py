"""Eviction policies shared by the capacity-bounded tiers (cpu, gpu, disk).

A policy only orders keys; the tier owns the bytes. The tier calls ``insert`` when a
chunk lands, ``touch`` on a hit, ``remove`` on delete, and ``victim`` until enough room
is free. ``victim`` never returns a key for which ``is_pinned`` is true: a chunk being
read, or held under a lease, stays.

Why S3-FIFO is the default: KV prefixes follow a skewed pattern. A few system prompts and
conversation roots are shared by many requests, while most chunks are the one-off tail
of a single request. Plain LRU lets a burst of one-off tails flush the shared roots (and
a prefix hit needs its root). S3-FIFO (Yang et al., SOSP'23) admits new chunks into a
small FIFO and promotes only those hit again into the main FIFO, so one-hit wonders
leave first. On the Mooncake conversation trace it beats LRU at small capacities (see
docs/benchmarks.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable

IsPinned = Callable[[str], bool]
_MAX_FREQ = 3


class EvictionPolicy(ABC):
    """Orders resident keys for eviction; sizes are in the tier's units (bytes or pages)."""

    @abstractmethod
    def insert(self, key: str, size: int) -> None:
        """A new resident key of ``size`` units."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """``key`` was read (a hit)."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """``key`` left the tier for another reason than eviction (delete, drop)."""

    @abstractmethod
    def victim(self, is_pinned: IsPinned) -> str | None:
        """Choose, forget and return the next key to evict; ``None`` if all are pinned."""

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self, capacity: int = 0) -> None:
        self._order: OrderedDict[str, int] = OrderedDict()

    def insert(self, key: str, size: int) -> None:
        self._order[key] = size
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self, is_pinned: IsPinned) -> str | None:
        for key in self._order:
            if not is_pinned(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, and a ghost list.

    * New keys enter ``small``, unless the ghost list remembers them (evicted from small
      recently, then asked for again): those go straight to ``main``.
    * Evicting from ``small`` (while it holds more than ``small_fraction`` of the
      capacity): a key read since insertion moves to ``main``; others leave (to ghost).
    * Evicting from ``main``: a key read recently gets its frequency decremented and is
      reinserted at the tail (a CLOCK-like second chance); others leave.
    """

    def __init__(self, capacity: int, small_fraction: float = 0.5) -> None:
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be in (0, 1), got {small_fraction}")
        self.capacity = capacity
        self.small_target = capacity * small_fraction
        self._small: OrderedDict[str, int] = OrderedDict()
        self._main: OrderedDict[str, int] = OrderedDict()
        self._ghost: OrderedDict[str, None] = OrderedDict()
        self._freq: dict[str, int] = {}
        self._small_size = 0
        self._main_size = 0

    def insert(self, key: str, size: int) -> None:
        self.remove(key)
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = size
            self._main_size += size
        else:
            self._small[key] = size
            self._small_size += size
        self._freq[key] = 0

    def touch(self, key: str) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, _MAX_FREQ)

    def remove(self, key: str) -> None:
        if key in self._small:
            self._small_size -= self._small.pop(key)
        elif key in self._main:
            self._main_size -= self._main.pop(key)
        self._freq.pop(key, None)

    def victim(self, is_pinned: IsPinned) -> str | None:
        if self._small and (self._small_size >= self.small_target or not self._main):
            key = self._evict_small(is_pinned)
            if key is not None:
                return key
        return self._evict_main(is_pinned)

    def _evict_small(self, is_pinned: IsPinned) -> str | None:
        for _ in range(len(self._small)):
            key, size = self._small.popitem(last=False)
            self._small_size -= size
            if self._freq[key] > 0 or is_pinned(key):
                self._main[key] = size  # read again: worth keeping
                self._main_size += size
                if self._main_size > self.capacity - self.small_target:
                    return None  # main is over its share: evict from there instead
                continue
            del self._freq[key]
            self._remember(key)
            return key
        return None

    def _evict_main(self, is_pinned: IsPinned) -> str | None:
        # Each key is revisited at most _MAX_FREQ + 1 times before it must leave, so this
        # bound ends the scan even when every key is pinned.
        for _ in range(len(self._main) * (_MAX_FREQ + 1) + 1):
            if not self._main:
                break
            key, size = self._main.popitem(last=False)
            if is_pinned(key) or self._freq[key] > 0:
                self._freq[key] = max(self._freq[key] - 1, 0)
                self._main[key] = size
                continue
            self._main_size -= size
            del self._freq[key]
            return key
        if self._small:  # main is all pinned: fall back to small
            return self._evict_small_any(is_pinned)
        return None

    def _evict_small_any(self, is_pinned: IsPinned) -> str | None:
        for key in self._small:
            if not is_pinned(key):
                self._small_size -= self._small.pop(key)
                del self._freq[key]
                self._remember(key)
                return key
        return None

    def _remember(self, key: str) -> None:
        self._ghost[key] = None
        while len(self._ghost) > max(len(self._freq), 1):
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._freq)

    def check_integrity(self) -> None:
        """Raise if the two queues and the size counters disagree."""
        if set(self._small) & set(self._main):
            raise AssertionError("a key is in both small and main")
        if len(self._small) + len(self._main) != len(self._freq):
            raise AssertionError(
                f"{len(self._small)} small + {len(self._main)} main != {len(self._freq)} tracked"
            )
        if (
            sum(self._small.values()) != self._small_size
            or sum(self._main.values()) != self._main_size
        ):
            raise AssertionError("queue size counters are off")


POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "s3fifo": S3FIFOPolicy,
}
"""Policy name -> factory taking the tier capacity (in the tier's units)."""
