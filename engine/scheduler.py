"""Continuous batching: which requests compute how many tokens in the next step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request: Request
    start: int  # tokens already computed (= position of the first new token)
    num_new_tokens: int
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token and so yields a new one."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    decodes: list[ScheduledRequest] = field(default_factory=list)  # one new token each
    prefills: list[ScheduledRequest] = field(default_factory=list)  # several new tokens
    preempted: list[Request] = field(default_factory=list)

    @property
    def scheduled(self) -> list[ScheduledRequest]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """FCFS with a per-step token budget; running requests go first, then waiting ones.

    A step's budget is shared: each running request gets its next token (or next prefill
    chunk), then waiting requests are admitted, their prefix-cache hits skipped and their
    prompts chunked to what is left. When blocks run out the most recently admitted
    running request is preempted: its blocks are freed and it recomputes later.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                self._add_scheduled(out, req, num_new)
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = self.kv.find_cached_prefix(req)
            num_cached = len(cached) * self.kv.block_size
            num_new = req.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, cached):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_scheduled(out, req, num_new)
            budget -= num_new

    def _add_scheduled(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        s = ScheduledRequest(req, req.num_computed_tokens, num_new, self.kv.block_ids(req.request_id))
        (out.decodes if num_new == 1 else out.prefills).append(s)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput) -> list[Request]:
        """Advance progress after the step ran; returns the requests that sampled a token."""
        sampled = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.kv.register_full_blocks(req)
            if s.samples:
                sampled.append(req)
        return sampled

    def finish(self, req: Request, reason: str) -> None:
        """Remove ``req`` from the queues and free its blocks."""
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
