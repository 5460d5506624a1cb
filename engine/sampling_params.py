"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

# What torch.Generator.manual_seed takes, as vLLM's protocol bounds it: a signed 64-bit int.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
# Below this a temperature overflows the logits (x / 1e-300 is inf, softmax then NaN):
# vLLM raises such temperatures to 0.01, which is greedy in all but name.
MIN_TEMPERATURE = 1e-2


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``seed`` (a signed 64-bit integer) makes a sampled request reproducible regardless
    of what it is batched with. A temperature in (0, 0.01) is raised to 0.01.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise InvalidRequestError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(
                f"temperature must be >= 0 and finite, got {self.temperature}"
            )
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if self.seed is not None and not (
            isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise InvalidRequestError(
                f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}"
            )
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
