"""What the tiered connector's scheduler side plans per step: loads and saves of chunks.

Index ranges, for a request whose engine cache holds 3 blocks, whose store holds 2
chunks (chunk = 4 blocks of 16 tokens) and whose prompt is 150 tokens::

    tokens     0    16   32   48   64   80   96  112  128  144 150
    blocks     |b0  |b1  |b2  |b3  |b4  |b5  |b6  |b7  |b8  |b9|
    chunks     |        c0         |        c1         |   (c2 would end at 192)
    engine     [==============)                               num_computed = 48
    store      [=======================================)     stored end   = 128
    load                      [========================)     start=48, end=128
    compute                                             [======)  128..150

Only whole chunks are fetched; a chunk partly covered by the engine's prefix (c0) is
fetched whole and only its blocks past ``start`` are written into the paged cache. A
load also stops one token before the prompt's end (that token must compute, and its
step yields the first output token), so a prompt whose stored prefix reaches its end
loads its last chunk in part and ends mid-block: the last token then computes alone,
as a decode step over the loaded KV (a prefill of the rest of that block would attend
to the whole context once per token). The scatter writes that last block whole; the
step's own KV for the computed token is written after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from connector.base import KVConnectorMetadata
from kvcore.keys import ChunkRef

if TYPE_CHECKING:
    from connector.lookup import Lookup


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Load chunks ``keys`` (starting at tokens ``chunk_starts``) and write tokens
    ``[start, end)`` into the request's blocks ``block_ids`` (its table up to ``end``)."""

    request_id: str
    keys: list[str]
    chunk_starts: list[int]
    start: int
    end: int
    block_ids: list[int]


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Save tokens ``[start, end)`` (one whole chunk) from blocks ``block_ids``."""

    request_id: str
    key: str
    start: int
    end: int
    block_ids: list[int]


@dataclass(slots=True)
class TieredConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass(slots=True)
class RequestState:
    """Scheduler-side state of one request, from its first admission attempt to its end."""

    refs: list[ChunkRef]  # the prompt's full chunks (and generated ones with save_decoded)
    tiers: list[str] = field(default_factory=list)  # tier of each leading stored chunk, at lookup
    lookup: Lookup | None = None  # the networked tiers' lookup, until the request is admitted
    saved_upto: int = 0  # tokens [0, saved_upto) are stored or being saved
    hit_end: int = 0  # where a load from the store would end (at most the prompt's end - 1)
    load: LoadSpec | None = None  # planned at admission, handed out by the next meta
    load_start: int = 0  # the load's token range, kept for metrics
    load_end: int = 0

    @property
    def refs_end(self) -> int:
        """End (tokens) of the last chunk known so far."""
        return self.refs[-1].end if self.refs else 0

    @property
    def stored_end(self) -> int:
        """End (tokens) of the stored prefix found at the last lookup."""
        return self.refs[len(self.tiers) - 1].end if self.tiers else 0

    def sources(self, end: int | None = None) -> dict[str, int]:
        """Tokens of the planned load per tier, counting only tokens before ``end``."""
        stop = self.load_end if end is None else min(end, self.load_end)
        out: dict[str, int] = {}
        for ref, tier in zip(self.refs, self.tiers, strict=False):
            n = min(ref.end, stop) - max(ref.start, self.load_start)
            if n > 0:
                out[tier] = out.get(tier, 0) + n
        return out


def plan_load(
    state: RequestState, request_id: str, block_ids: list[int], start: int, end: int
) -> LoadSpec:
    """The load of tokens ``[start, end)`` from the stored chunks that overlap it."""
    refs = [r for r in state.refs[: len(state.tiers)] if r.end > start and r.start < end]
    return LoadSpec(
        request_id, [r.key for r in refs], [r.start for r in refs], start, end, list(block_ids)
    )


def plan_saves(
    state: RequestState, request_id: str, block_ids: list[int], computed_end: int, block_size: int
) -> list[SaveSpec]:
    """Whole chunks not yet saved whose tokens are all computed by ``computed_end``."""
    saves = []
    for r in state.refs:
        if r.start >= state.saved_upto and r.end <= computed_end:
            blocks = block_ids[r.start // block_size : r.end // block_size]
            saves.append(SaveSpec(request_id, r.key, r.start, r.end, blocks))
            state.saved_upto = r.end
    return saves
