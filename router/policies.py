"""Routing policies: which of the candidate backends takes a request.

Every policy sees only healthy candidates the request has not already failed on, and
returns a ``Decision`` with the prefix (in tokens) it predicts the chosen backend holds.
Ties rotate, so equal backends share cold traffic.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

from router.backends import Backend
from router.kv_index import KVIndex


class Decision(NamedTuple):
    backend: Backend
    hit_tokens: int  # predicted cached prefix on ``backend``; 0 when the policy cannot tell


class Policy(ABC):
    name: str = ""
    needs_hashes = False  # whether ``choose`` reads the request's block hashes

    def __init__(self) -> None:
        self._turn = itertools.count()

    @abstractmethod
    def choose(self, candidates: Sequence[Backend], hashes: Sequence[bytes] = ()) -> Decision:
        """Pick one of ``candidates`` (non-empty) for a request with these block hashes."""

    def _rotated(self, candidates: Sequence[Backend]) -> list[Backend]:
        k = next(self._turn) % len(candidates)
        return [*candidates[k:], *candidates[:k]]


class RoundRobin(Policy):
    name = "round_robin"

    def choose(self, candidates: Sequence[Backend], hashes: Sequence[bytes] = ()) -> Decision:
        return Decision(self._rotated(candidates)[0], 0)


class LeastLoad(Policy):
    """Fewest requests in flight (or queued, when the backend reports it)."""

    name = "least_load"

    def choose(self, candidates: Sequence[Backend], hashes: Sequence[bytes] = ()) -> Decision:
        return Decision(min(self._rotated(candidates), key=lambda b: b.load), 0)


class PrefixAware(Policy):
    """Longest cached prefix weighted by tier, balanced against load.

    ``score = weighted_hit_tokens - alpha * load`` over the candidates whose load is at
    most ``min_load + load_cap``: ``alpha`` prices one queued request in prompt tokens,
    and the cap keeps one hot prefix from piling every request on one instance however
    long the prefix is. Cold requests (no hit anywhere) go to the least loaded.
    """

    name = "prefix_aware"
    needs_hashes = True

    def __init__(
        self, index: KVIndex, block_size: int, alpha: float = 32.0, load_cap: int = 4
    ) -> None:
        super().__init__()
        if alpha < 0 or load_cap < 0:
            raise ValueError(f"alpha and load_cap must be >= 0, got {alpha}, {load_cap}")
        self.index, self.block_size = index, block_size
        self.alpha, self.load_cap = alpha, load_cap

    def choose(self, candidates: Sequence[Backend], hashes: Sequence[bytes] = ()) -> Decision:
        floor = min(b.load for b in candidates)
        eligible = [b for b in self._rotated(candidates) if b.load <= floor + self.load_cap]
        matches = self.index.match(hashes, [b.url for b in eligible], self.block_size)

        def score(b: Backend) -> tuple[float, int]:
            return matches[b.url].weighted_tokens - self.alpha * b.load, -b.load

        best = max(eligible, key=score)
        return Decision(best, matches[best.url].hit_tokens)


def make_policy(name: str, index: KVIndex | None = None, block_size: int = 16, **kw) -> Policy:
    """The policy called ``name``; ``prefix_aware`` needs the KV index."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "prefix_aware":
        return PrefixAware(index if index is not None else KVIndex(), block_size, **kw)
    raise ValueError(f"unknown policy {name!r}; choose round_robin, least_load or prefix_aware")


POLICY_NAMES = ("round_robin", "least_load", "prefix_aware")
