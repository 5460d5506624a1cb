"""What ``generate`` returns per request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served by the engine's prefix cache
    num_preemptions: int = 0
    kv_sources: dict[str, int] = field(default_factory=dict)  # tokens per KV source

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    logprobs: list[float] | None
    metrics: RequestMetrics
    # Disaggregated prefill/decode (connector/disagg.py): the response's kv_transfer_params,
    # and, until the server completes it off the engine loop, a prefill leg's pending hand-off.
    kv_transfer_params: dict | None = None
    kv_transfer_pending: object | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict:
        m = self.metrics
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs,
            "metrics": {
                "num_prompt_tokens": m.num_prompt_tokens,
                "num_cached_tokens": m.num_cached_tokens,
                "num_generated_tokens": len(self.token_ids),
                "ttft_s": m.ttft,
                "e2e_s": (m.finished_time - m.arrival_time) if m.finished_time else None,
                "num_preemptions": m.num_preemptions,
                "kv_sources": dict(m.kv_sources),
            },
        }
