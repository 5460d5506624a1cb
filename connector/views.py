"""What a connector reads of an engine's request and step, as protocols.

The connector sits below the engine (docs/layering.md): it never imports the engine's
types. Our engine's ``engine.request.Request`` and ``engine.scheduler.SchedulerOutput``
satisfy these structurally, and so can another engine's objects (vLLM's ``Request`` carries
the same names), which is what lets one connector serve both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kvcore.keys import BlockHash


class ConnectorRequest(Protocol):
    """One request as the connector sees it: its tokens, block hashes and hand-off state."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    cache_salt: str | None
    block_hashes: list[BlockHash]
    kv_transfer_params: dict[str, Any] | None  # P/D: the leg's parameters as the client sent them
    kv_transfer_pending: Any  # P/D: a prefill leg's hand-off while its KV is being saved

    @property
    def all_token_ids(self) -> list[int]: ...

    @property
    def num_tokens(self) -> int: ...


class ScheduledWork(Protocol):
    """One request's share of a step: ``num_new_tokens`` from ``start`` into ``block_ids``."""

    request: ConnectorRequest
    start: int
    num_new_tokens: int
    block_ids: list[int]


class ConnectorStep(Protocol):
    """One engine step as the connector's scheduler side sees it."""

    @property
    def scheduled(self) -> Sequence[ScheduledWork]: ...
