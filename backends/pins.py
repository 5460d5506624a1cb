"""Reference-counted pins: a pinned chunk is being read or leased and must not be evicted."""

from __future__ import annotations

from collections.abc import Sequence


class PinCounts:
    """Counts pins per key. Not thread-safe: callers hold their backend's lock."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._counts

    def pin(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1

    def unpin(self, keys: Sequence[str]) -> list[str]:
        """Drop one pin per key; returns the keys no longer pinned at all."""
        released = []
        for key in keys:
            left = self._counts.get(key, 0) - 1
            if left > 0:
                self._counts[key] = left
            elif self._counts.pop(key, None) is not None:
                released.append(key)
        return released

    def clear(self) -> None:
        self._counts.clear()
