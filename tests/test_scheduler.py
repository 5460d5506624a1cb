"""Exact scheduling decisions on tiny sizes (no model: steps are simulated)."""

from __future__ import annotations

import pytest

from connector.base import KVConnectorBase, KVConnectorMetadata
from engine.kv_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

BS = 4


def make(num_blocks=16, max_seqs=4, budget=32, chunked=True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, chunked), KVCacheManager(num_blocks, BS))


def req(rid: str, n: int, base: int = 0) -> Request:
    return Request(rid, [base + i for i in range(n)], SamplingParams(max_tokens=8), BS)


def run_step(s: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule, then pretend the model ran and sampled token 7 where a token is due."""
    out = s.schedule()
    plan = [(x.request.request_id, x.start, x.num_new_tokens) for x in out.scheduled]
    for r in s.update(out):
        r.append_output(7, None)
    return plan


def test_running_requests_decode_before_waiting_ones_prefill():
    s = make(budget=12)
    s.add_request(req("a", 6))
    assert run_step(s) == [("a", 0, 6)]
    s.add_request(req("b", 20, base=100))
    assert run_step(s) == [("a", 6, 1), ("b", 0, 11)]  # b gets the 11 tokens left of 12
    assert run_step(s) == [("a", 7, 1), ("b", 11, 9)]
    assert run_step(s) == [("a", 8, 1), ("b", 20, 1)]
    s.kv.check_integrity()


def test_without_chunked_prefill_a_long_prompt_waits_for_a_whole_step():
    s = make(budget=12, chunked=False)
    s.add_request(req("a", 6))
    s.add_request(req("b", 20, base=100))
    assert run_step(s) == [("a", 0, 6)]
    assert run_step(s) == [("a", 6, 1)]  # b never fits in 12 tokens
    assert [r.request_id for r in s.waiting] == ["b"]


def test_max_num_seqs_caps_the_running_set():
    s = make(max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 3, base=10 * i))
    assert run_step(s) == [("r0", 0, 3), ("r1", 0, 3)]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_prefix_hit_skips_cached_blocks():
    s = make()
    s.add_request(req("a", 9))
    run_step(s)
    s.add_request(req("b", 10))  # same first 9 tokens: blocks 0 and 1 are cached
    assert run_step(s) == [("a", 9, 1), ("b", 8, 2)]
    b = s.running[1]
    assert b.num_cached_tokens == 8
    assert s.kv.block_ids("b")[:2] == s.kv.block_ids("a")[:2]


def test_preemption_takes_the_latest_admitted_and_it_recomputes():
    s = make(num_blocks=4, budget=64)
    s.add_request(req("a", 7))
    s.add_request(req("b", 7, base=100))
    assert run_step(s) == [("a", 0, 7), ("b", 0, 7)]  # 2 blocks each: the pool is full
    assert run_step(s) == [("a", 7, 1), ("b", 7, 1)]  # both fit in their second block
    # a needs a third block: b is preempted, freeing its two blocks
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    assert [r.request_id for r in out.preempted] == ["b"]
    b = s.waiting[0]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert b.output_token_ids == [7, 7]  # recompute keeps what was generated
    s.kv.check_integrity()


def test_finish_and_abort_free_blocks():
    s = make(num_blocks=8)
    s.add_request(req("a", 9))
    s.add_request(req("b", 5, base=50))
    run_step(s)
    a, b = s.running
    s.finish(a, "stop")
    s.finish(b, "abort")
    assert not s.running and not s.has_unfinished()
    assert (a.finish_reason, b.finish_reason) == ("stop", "abort")
    assert s.kv.pool.num_free_blocks == 8
    s.kv.check_integrity()


def test_abort_of_a_waiting_request():
    s = make(max_seqs=1)
    s.add_request(req("a", 3))
    s.add_request(req("b", 3, base=9))
    run_step(s)
    b = s.waiting[0]
    s.finish(b, "abort")
    assert not s.waiting and b.is_finished


class LookingUp(KVConnectorBase):
    """A scheduler-side connector that answers "not yet" (None) for the requests in
    ``pending`` and 0 tokens for the others; records who it admitted."""

    def __init__(self, pending: set[str]) -> None:
        self.pending, self.admitted = pending, []

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return (None if request.request_id in self.pending else 0), False

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        self.admitted.append(request.request_id)

    def build_connector_meta(self, scheduler_output):
        return KVConnectorMetadata()

    def start_load_kv(self, metadata): ...
    def wait_for_layer_load(self, layer): ...
    def save_kv_layer(self, layer, kv_layer, attn_metadata=None, **kwargs): ...
    def wait_for_save(self, discard=False): ...


def test_a_request_still_being_looked_up_keeps_its_place_and_others_run():
    conn = LookingUp({"a"})
    s = Scheduler(SchedulerConfig(4, 32), KVCacheManager(16, BS), conn)
    for rid, base in (("a", 0), ("b", 100), ("c", 200)):
        s.add_request(req(rid, 5, base=base))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["b", "c"]
    assert [r.request_id for r in out.awaiting_lookup] == ["a"]
    assert [r.request_id for r in s.waiting] == ["a"] and s.kv.block_ids("a") == []
    for r in s.update(out):
        r.append_output(7, None)
    s.add_request(req("d", 5, base=300))
    conn.pending.clear()  # a's lookup answered: a is admitted before d, in queue order
    assert run_step(s) == [("b", 5, 1), ("c", 5, 1), ("a", 0, 5), ("d", 0, 5)]
    assert conn.admitted == ["b", "c", "a", "d"] and not s.waiting
    s.kv.check_integrity()


class FailsOnFinish(LookingUp):
    """A connector whose ``request_finished`` raises (a bug, a store gone mid-call)."""

    def request_finished(self, request, block_ids):
        raise RuntimeError("request_finished failed")


def test_a_connector_failing_at_finish_does_not_leak_the_requests_blocks():
    s = Scheduler(SchedulerConfig(4, 32), KVCacheManager(16, BS), FailsOnFinish(set()))
    s.add_request(req("a", 20))
    run_step(s)
    a = s.running[0]
    assert s.kv.block_ids("a")
    with pytest.raises(RuntimeError, match="request_finished failed"):
        s.finish(a, "abort")
    assert a.is_finished and not s.running and s.kv.block_ids("a") == []
    assert s.kv.pool.num_free_blocks == 16
    s.kv.check_integrity()


def test_decode_groups_keep_padding_under_twice():
    from engine.batch import decode_groups
    from engine.scheduler import ScheduledRequest

    def sched(start: int) -> ScheduledRequest:
        return ScheduledRequest(req(f"r{start}", start + 1), start, 1, [])

    groups = decode_groups([sched(s) for s in (100, 3, 40, 9, 20, 33)], BS)
    # block counts 1, 3, 6, 9, 11, 26: cut where a group's longest exceeds 2x its shortest
    assert [[s.start for s in g] for g in groups] == [[3], [9, 20], [33, 40], [100]]
