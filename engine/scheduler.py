"""Continuous batching: which requests compute how many tokens in the next step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.kv_manager import KVCacheManager
from engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from connector.base import KVConnectorBase, KVConnectorMetadata
    from engine.block_pool import KVBlock
    from kvcore.events import KVCacheEvent


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True
    enable_kv_events: bool = False


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
    connector_meta: KVConnectorMetadata | None = None  # the connector's loads and saves
    load_failed: list[Request] = field(default_factory=list)  # set by update(): KV recomputes
    awaiting_lookup: list[Request] = field(default_factory=list)  # skipped: connector not ready

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

    With a KV connector, an admitted request's prompt may continue past its prefix-cache
    hits with tokens the connector loads (external tokens: they need blocks but no
    compute budget); a load that fails is recomputed from its first failed block. A
    request the connector is still looking up (it answers ``None``) is skipped for the
    step, keeping its place in the queue, and the requests behind it are admitted.
    """

    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, connector: KVConnectorBase | None = None
    ) -> None:
        self.config = config
        self.kv = kv
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._kv_events: list[KVCacheEvent] = []

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        if self.connector is not None:
            out.connector_meta = self.connector.build_connector_meta(out)
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
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[i]
            cached = self.kv.find_cached_prefix(req)
            num_external = self._external_tokens(req, len(cached) * self.kv.block_size)
            if num_external is None:  # being looked up: ask again next step
                out.awaiting_lookup.append(req)
                i += 1
                continue
            num_new = self._admit(req, budget, cached, num_external)
            if num_new is None:
                break
            del self.waiting[i]
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_scheduled(out, req, num_new)
            budget -= num_new

    def _admit(
        self, req: Request, budget: int, cached: list[KVBlock], num_external: int
    ) -> int | None:
        """Give ``req`` its ``cached`` prefix, ``num_external`` tokens and blocks for its
        first chunk; the number of tokens it computes now, or None (nothing changed) if it
        cannot run."""
        num_cached = len(cached) * self.kv.block_size
        num_new = req.num_tokens - num_cached - num_external
        if num_new > budget:
            if not self.config.enable_chunked_prefill:
                return None
            num_new = budget
        if not self.kv.allocate_slots(req, num_external + num_new, cached):
            return None
        req.num_computed_tokens = num_cached + num_external
        if self.connector is not None:
            self.connector.update_state_after_alloc(
                req, self.kv.block_ids(req.request_id), num_external
            )
        if req.num_cached_tokens < 0:  # as vLLM: the prefix-cache hits of the first admission
            req.num_cached_tokens = num_cached
        req.kv_sources = self._kv_sources(req, num_cached, req.num_computed_tokens)
        return num_new

    def _kv_sources(self, req: Request, num_cached: int, end: int) -> dict[str, int]:
        """Prompt tokens of ``req``'s latest admission per KV source: the engine's cache
        (``num_cached``), then each medium the connector loads from, up to token ``end``.

        Each admission replaces the last one's figures: after a preemption the request
        recomputes, and what it then finds in the engine's cache and the store is what
        its answer is computed from. Tokens past the prompt (a re-admission after
        decoding) are not prompt tokens and are not counted.
        """
        prompt = len(req.prompt_token_ids)
        sources = {"engine": min(num_cached, prompt)}
        if self.connector is not None:
            sources.update(self.connector.external_token_sources(req, min(end, prompt)))
        return sources

    def _external_tokens(self, req: Request, num_cached: int) -> int | None:
        """Prompt tokens after the engine's prefix the connector can load (0 without one);
        None while the connector is still looking ``req`` up."""
        if self.connector is None:
            return 0
        n, _ = self.connector.get_num_new_matched_tokens(req, num_cached)
        if n is None:
            return None
        return min(n, req.num_tokens - 1 - num_cached)  # one token always computes

    def _add_scheduled(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        s = ScheduledRequest(
            req, req.num_computed_tokens, num_new, self.kv.block_ids(req.request_id)
        )
        (out.decodes if num_new == 1 else out.prefills).append(s)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput) -> list[Request]:
        """Advance progress after the step ran; returns the requests that sampled a token.

        A request whose KV load failed in this step goes back to its first failed block
        (it recomputes from there) and samples nothing: its logits read wrong KV.
        """
        failed = self.connector.get_block_ids_with_load_errors() if self.connector else set()
        sampled = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted while the step ran
                continue
            good_end = self._first_failed_token(s, failed) if failed else None
            if good_end is not None:
                self._recompute_from(req, good_end)
                out.load_failed.append(req)
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.kv.register_full_blocks(req)
            if s.samples:
                sampled.append(req)
        self._collect_kv_events()
        return sampled

    def _first_failed_token(self, s: ScheduledRequest, failed: set[int]) -> int | None:
        bad = next((i for i, b in enumerate(s.block_ids) if b in failed), None)
        return None if bad is None else bad * self.kv.block_size

    def _recompute_from(self, req: Request, good_end: int) -> None:
        req.num_computed_tokens = good_end
        self.kv.register_full_blocks(req)
        if req.kv_sources:  # count only what really loaded
            req.kv_sources = self._kv_sources(req, req.kv_sources.get("engine", 0), good_end)

    def _collect_kv_events(self) -> None:
        """Turn this step's block-pool records into typed events (or drop them)."""
        raw = self.kv.pool.take_events()
        if not self.config.enable_kv_events:
            return
        from kvcore.events import engine_events

        self._kv_events += engine_events(raw, self.kv.pool.cached, self.kv.block_size)

    def take_kv_events(self) -> list[KVCacheEvent]:
        """Events of the engine's cache (medium ``GPU``) and of the connector's media."""
        events, self._kv_events = self._kv_events, []
        if self.connector is not None:
            events += self.connector.take_events()
        return events

    def finish(self, req: Request, reason: str) -> None:
        """Remove ``req`` from the queues and free its blocks."""
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        try:  # a connector that raises must not leak the request's blocks
            if self.connector is not None:
                self.connector.request_finished(req, self.kv.block_ids(req.request_id))
        finally:
            self.kv.free(req)
            req.status = RequestStatus.FINISHED
            req.finish_reason = reason
