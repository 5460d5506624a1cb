"""The pool of KV blocks: ref counts, the prefix-cache hash map and the LRU free queue."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvcore.keys import BlockHash


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None  # the tokens whose KV it holds, to confirm hits
    parent_hash: BlockHash | None = None  # the previous block's hash, for KV events
    prev: KVBlock | None = None  # free-queue links; None when not queued
    next: KVBlock | None = None


class FreeBlockQueue:
    """Free blocks in eviction order: the head is evicted (reused) first.

    A custom doubly linked list rather than a deque because a cache hit must take a block
    out of the *middle* of the queue in O(1). Ordering rule: a block freed later goes
    behind every block freed before it (LRU), and a request frees its blocks tail-first so
    that a prefix's last blocks are evicted before its shared first blocks.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev
        assert last is not None and block.prev is None and block.next is None
        last.next, block.prev, block.next, self._tail.prev = block, last, self._tail, block
        self.size += 1

    def popleft(self) -> KVBlock:
        first = self._head.next
        if first is self._tail or first is None:
            raise IndexError("no free blocks")
        self.remove(first)
        return first

    def remove(self, block: KVBlock) -> None:
        assert block.prev is not None and block.next is not None, "block is not queued"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.size -= 1

    def __iter__(self):
        node = self._head.next
        while node is not None and node is not self._tail:
            yield node
            node = node.next


class BlockPool:
    """Owns every block. A block is either referenced (ref_cnt > 0) or in the free queue;
    a free block may still hold cached KV (its hash stays in the map) until it is reused.

    ``events`` records ``("stored" | "removed" | "cleared", block_hash)`` for the KV-event
    publisher (``kvcore.events.engine_events`` turns them into typed events).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self.cached: dict[BlockHash, KVBlock] = {}
        self.events: list[tuple[str, BlockHash]] = []

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.size

    def lookup(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> KVBlock | None:
        """The cached block for ``block_hash`` if it really holds ``token_ids``."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache-hit blocks, pulling free ones out of the queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        """``n`` fresh blocks from the head of the free queue, evicting their cached KV."""
        if n > self.free_queue.size:
            raise ValueError(f"cannot allocate {n} blocks, {self.free_queue.size} free")
        out = []
        for _ in range(n):
            b = self.free_queue.popleft()
            self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the queue in the given order."""
        for b in blocks:
            assert b.ref_cnt > 0, f"block {b.block_id} freed more often than referenced"
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self.free_queue.append(b)

    def cache_block(
        self,
        block: KVBlock,
        block_hash: BlockHash,
        token_ids: tuple[int, ...],
        parent_hash: BlockHash | None = None,
    ) -> None:
        """Record that ``block`` now holds the full block named ``block_hash``."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash, block.token_ids, block.parent_hash = block_hash, token_ids, parent_hash
        if block_hash not in self.cached:  # a duplicate keeps the first block as the hit
            self.cached[block_hash] = block
            self.events.append(("stored", block_hash))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if self.free_queue.size != len(self.blocks):
            return False
        for b in self.blocks:
            b.block_hash = b.token_ids = b.parent_hash = None
        self.cached.clear()
        self.events.append(("cleared", b""))
        return True

    def take_events(self) -> list[tuple[str, BlockHash]]:
        events, self.events = self.events, []
        return events

    def _evict(self, block: KVBlock) -> None:
        h = block.block_hash
        if h is None:
            return
        if self.cached.get(h) is block:
            del self.cached[h]
            self.events.append(("removed", h))
        block.block_hash = block.token_ids = block.parent_hash = None

    def check_integrity(self) -> None:
        """Raise if ref counts, the free queue and the hash map disagree."""
        queued = list(self.free_queue)
        if len(queued) != self.free_queue.size:
            raise AssertionError(
                f"free queue holds {len(queued)} blocks, size says {self.free_queue.size}"
            )
        if len({b.block_id for b in queued}) != len(queued):
            raise AssertionError("a block is queued twice")
        bad = [b.block_id for b in queued if b.ref_cnt != 0]
        if bad:
            raise AssertionError(f"{len(bad)} queued blocks are referenced, e.g. block {bad[0]}")
        n_zero = sum(1 for b in self.blocks if b.ref_cnt == 0)
        if n_zero != len(queued):
            raise AssertionError(f"{n_zero} blocks have ref_cnt 0 but {len(queued)} are queued")
        for h, b in self.cached.items():
            if b.block_hash != h:
                raise AssertionError(
                    f"hash map entry points at block {b.block_id} holding another hash"
                )
