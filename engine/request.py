"""A request's state as it moves through the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling_params import SamplingParams
from kvcore.keys import BlockHash, block_hashes


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; recomputes from scratch when rescheduled
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Tokens, progress and outcome of one generation request.

    ``num_computed_tokens`` counts tokens whose KV is in the cache; the next step computes
    ``all_token_ids[num_computed_tokens:]`` (or a chunk of it). Block hashes cover every
    full block of ``all_token_ids`` and are kept up to date as tokens are appended.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    block_size: int
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first schedule
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_text_len: int | None = None  # where a matched stop string starts in the text
    first_token_time: float | None = None
    num_preemptions: int = 0
    block_hashes: list[BlockHash] = field(default_factory=list)
    kv_sources: dict[str, int] = field(
        default_factory=dict
    )  # prompt tokens per source, last admission
    generator: torch.Generator | None = None
    # Disaggregated prefill/decode (connector/disagg.py): the leg's parameters as the
    # client sent them, and a prefill leg's hand-off once its KV is being saved.
    kv_transfer_params: dict[str, Any] | None = None
    kv_transfer_pending: Any = None

    def __post_init__(self) -> None:
        self._extend_hashes()
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int, logprob: float | None) -> None:
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self._extend_hashes()

    def _extend_hashes(self) -> None:
        done = len(self.block_hashes)
        if (done + 1) * self.block_size > self.num_tokens:
            return
        parent = self.block_hashes[-1] if done else None
        self.block_hashes += block_hashes(
            self.all_token_ids,
            self.block_size,
            cache_salt=self.cache_salt,
            start=done,
            parent=parent,
        )
