"""Exact block ids, eviction order and ref counts of the block pool and KV manager."""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool
from engine.kv_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4


def make_req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), BS, cache_salt=salt)


def compute(kv: KVCacheManager, req: Request) -> list[int]:
    """Admit ``req`` with its prefix-cache hits and pretend its prompt was computed."""
    hits = kv.find_cached_prefix(req)
    assert kv.allocate_slots(req, req.num_tokens - len(hits) * BS, hits)
    req.num_computed_tokens = req.num_tokens
    kv.register_full_blocks(req)
    return kv.block_ids(req.request_id)


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_queue]


def test_allocate_takes_from_the_head_and_free_appends_in_given_order():
    pool = BlockPool(5)
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1]
    assert [b.ref_cnt for b in a] == [1, 1]
    assert free_ids(pool) == [2, 3, 4]
    pool.free(reversed(a))
    assert free_ids(pool) == [2, 3, 4, 1, 0]
    assert [b.block_id for b in pool.allocate(4)] == [2, 3, 4, 1]
    pool.check_integrity()


def test_allocate_more_than_free_raises():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="cannot allocate 3 blocks, 2 free"):
        pool.allocate(3)


def test_prefix_hit_reuses_blocks_and_counts_references():
    kv = KVCacheManager(8, BS)
    a = make_req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert compute(kv, a) == [0, 1, 2]
    b = make_req("b", list(range(8)) + [99, 98, 97])
    assert compute(kv, b) == [0, 1, 3]  # shares blocks 0 and 1
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    assert len(kv.pool.cached) == 2
    kv.check_integrity()


def test_a_hit_leaves_at_least_one_token_to_compute():
    kv = KVCacheManager(8, BS)
    compute(kv, make_req("a", list(range(8))))
    again = make_req("b", list(range(8)))
    assert len(kv.find_cached_prefix(again)) == 1  # 8 tokens cached, but only 4 reusable


def test_freed_blocks_stay_cached_and_tails_are_evicted_first():
    kv = KVCacheManager(6, BS)
    a = make_req("a", list(range(12)))  # blocks 0,1,2 all full
    compute(kv, a)
    kv.free(a)
    # tail-first: block 2 (the prefix's last) is evicted before 1, then 0
    assert free_ids(kv.pool) == [3, 4, 5, 2, 1, 0]
    assert len(kv.pool.cached) == 3
    b = make_req("b", [50 + i for i in range(16)])  # needs 4 fresh blocks
    assert compute(kv, b) == [3, 4, 5, 2]
    assert len(kv.pool.cached) == 2 + 4  # block 2's hash was evicted, b's 4 blocks cached
    assert kv.pool.take_events()[-5:] == [
        ("removed", a.block_hashes[2]),
        *[("stored", h) for h in b.block_hashes],
    ]
    c = make_req("c", list(range(9)))  # still hits blocks 0 and 1
    assert kv.find_cached_prefix(c) == [kv.pool.blocks[0], kv.pool.blocks[1]]
    kv.check_integrity()


def test_hit_pulls_a_free_block_out_of_the_queue():
    kv = KVCacheManager(4, BS)
    a = make_req("a", list(range(5)))
    compute(kv, a)
    kv.free(a)
    assert free_ids(kv.pool) == [2, 3, 1, 0]
    b = make_req("b", list(range(4)) + [7, 7])
    assert compute(kv, b) == [0, 2]
    assert free_ids(kv.pool) == [3, 1]
    assert kv.pool.blocks[0].ref_cnt == 1
    kv.check_integrity()


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(3, BS)
    a = make_req("a", list(range(8)))
    compute(kv, a)
    b = make_req("b", list(range(100, 112)))
    assert not kv.allocate_slots(b, 12)
    assert kv.block_ids("b") == []
    assert kv.pool.num_free_blocks == 1
    kv.check_integrity()


def test_hit_requires_equal_tokens_not_only_equal_hash():
    kv = KVCacheManager(4, BS)
    a = make_req("a", list(range(5)))
    compute(kv, a)
    block = kv.pool.blocks[0]
    block.token_ids = (9, 9, 9, 9)  # as if a hash collision had mapped other tokens here
    assert kv.find_cached_prefix(make_req("b", list(range(6)))) == []


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(8, BS)
    compute(kv, make_req("a", list(range(9)), salt="tenant-1"))
    assert kv.find_cached_prefix(make_req("b", list(range(9)), salt="tenant-2")) == []
    assert kv.find_cached_prefix(make_req("c", list(range(9)))) == []
    assert len(kv.find_cached_prefix(make_req("d", list(range(9)), salt="tenant-1"))) == 2


def test_check_integrity_reports_corruption():
    kv = KVCacheManager(4, BS)
    a = make_req("a", list(range(5)))
    compute(kv, a)
    kv.pool.blocks[0].ref_cnt = 5
    with pytest.raises(AssertionError, match="block 0 has ref_cnt 5 but 1 holders"):
        kv.check_integrity()
    kv.pool.blocks[0].ref_cnt = 1
    kv.pool.blocks[3].ref_cnt = 1  # a referenced block still sitting in the free queue
    with pytest.raises(AssertionError, match="queued blocks are referenced"):
        kv.pool.check_integrity()


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(4, BS)
    a = make_req("a", list(range(5)))
    compute(kv, a)
    assert not kv.pool.reset_prefix_cache()
    kv.free(a)
    assert kv.pool.reset_prefix_cache()
    assert kv.pool.cached == {}
    assert kv.find_cached_prefix(make_req("b", list(range(5)))) == []
