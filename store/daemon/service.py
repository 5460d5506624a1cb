"""What the daemon does, whatever the transport: checked requests against one TieredStore.

The gRPC API and the bulk stream are thin adapters over ``StoreService``: the checks
(checks.py) come first, so bad input never touches a stored chunk; then every get takes
the one get path (get_path.py), and every put ends in ``put`` or the first tier's
``commit`` (put_path.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcore.chunk import Chunk
from store.daemon.checks import BadRequest, Limits, OverLimit, RequestChecks
from store.daemon.get_path import GetPath, Placed, PrefixCache, SizeIndex
from store.metrics import TierStats
from store.tiered import TieredStore

__all__ = ["BadRequest", "Limits", "OverLimit", "Placed", "StoreService"]


class StoreService(RequestChecks):
    """Checked lookup/put/get/delete/stats over ``store`` (which the caller owns)."""

    def __init__(self, store: TieredStore, limits: Limits | None = None) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.sizes = SizeIndex()
        self.prefixes = PrefixCache()
        self.gets = GetPath(store, self.sizes)  # the one get path, every transport's

    def lookup(self, keys: Sequence[str]) -> list[str]:
        """The tier of each leading stored key."""
        return self.store.locate(self.check_keys(keys))

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Store already-checked chunks; per chunk, whether some tier holds it now."""
        for c in chunks:
            self.sizes.add(c.key, c.header.nbytes)
        return list(self.store.put(chunks).stored)

    def delete(self, keys: Sequence[str]) -> int:
        return self.store.delete(self.check_keys(keys))

    def stats(self) -> dict[str, TierStats]:
        return self.store.stats()
