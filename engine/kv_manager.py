"""Per-request block tables on top of the block pool, with prefix-cache lookup."""

from __future__ import annotations

from engine.block_pool import BlockPool, KVBlock
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps each request to the blocks holding its KV and registers full blocks for reuse.

    Invariant: a running request holds ``cdiv(num_computed_tokens + scheduled, block_size)``
    blocks; the first ``num_registered`` of them are in the prefix-cache map.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_registered: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def find_cached_prefix(self, req: Request) -> list[KVBlock]:
        """Longest run of cached blocks matching ``req``'s leading full blocks.

        At least one token is always left to compute, since the step that computes it is
        what produces the next token's logits.
        """
        if not self.pool.enable_caching:
            return []
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        tokens = req.all_token_ids
        hits = []
        for i, h in enumerate(req.block_hashes[:max_blocks]):
            block = self.pool.lookup(h, tuple(tokens[i * bs : (i + 1) * bs]))
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(
        self, req: Request, num_new_tokens: int, cached: list[KVBlock] | None = None
    ) -> bool:
        """Give ``req`` blocks for ``num_new_tokens`` more tokens (after any ``cached`` hits).

        Returns False, changing nothing, when the free blocks do not suffice.
        """
        cached = cached or []
        blocks = self._blocks.get(req.request_id, [])
        total = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(blocks) - len(cached)
        taken_from_free = sum(1 for b in cached if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - taken_from_free:
            return False
        self.pool.touch(cached)
        blocks = self._blocks.setdefault(req.request_id, blocks)
        blocks.extend(cached)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        self._num_registered.setdefault(req.request_id, len(cached))
        return True

    def register_full_blocks(self, req: Request) -> None:
        """Put the blocks ``req`` has completely computed into the prefix-cache map."""
        bs = self.block_size
        blocks = self._blocks[req.request_id]
        start = self._num_registered[req.request_id]
        n_full = req.num_computed_tokens // bs
        tokens = req.all_token_ids
        for i in range(start, n_full):
            parent = req.block_hashes[i - 1] if i else None
            self.pool.cache_block(
                blocks[i], req.block_hashes[i], tuple(tokens[i * bs : (i + 1) * bs]), parent
            )
        self._num_registered[req.request_id] = max(start, n_full)

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks, last block first so tails are evicted before shared heads."""
        blocks = self._blocks.pop(req.request_id, [])
        self._num_registered.pop(req.request_id, None)
        self.pool.free(reversed(blocks))

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held: dict[int, int] = {}
        for blocks in self._blocks.values():
            for b in blocks:
                held[b.block_id] = held.get(b.block_id, 0) + 1
        for b in self.pool.blocks:
            if b.ref_cnt != held.get(b.block_id, 0):
                raise AssertionError(
                    f"block {b.block_id} has ref_cnt {b.ref_cnt} but {held.get(b.block_id, 0)} holders"
                )
