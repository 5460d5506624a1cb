"""``--kv-role``: an engine that only saves KV to its store (producer), only loads it
(consumer), or both.

Interim home: the role belongs in ``ConnectorContext`` (``kv_role``) and
``TieredConnector`` (skip the store lookup for a producer, plan no saves for a
consumer). Until the connector takes it, :class:`RoleConnector` wraps any connector and
filters its scheduler side, which is where loads and saves are decided:

* producer: ``get_num_new_matched_tokens`` still runs (the connector learns which chunks
  are stored and so need no save) but reports no tokens to load;
* consumer: ``build_connector_meta`` drops the step's saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from connector.base import KVConnectorBase, KVConnectorMetadata
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine

if TYPE_CHECKING:
    from connector.events import KVCacheEvent
    from engine.loader import ModelSource
    from engine.request import Request
    from engine.scheduler import SchedulerOutput

KV_ROLES = ("both", "producer", "consumer")


class RoleConnector(KVConnectorBase):
    """``inner`` restricted to ``role``; every other call goes straight through."""

    def __init__(self, inner: KVConnectorBase, role: str) -> None:
        if role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {', '.join(KV_ROLES)}, got {role!r}")
        super().__init__(inner.context)
        self.inner, self.role = inner, role

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        matched = self.inner.get_num_new_matched_tokens(request, num_computed_tokens)
        return (0, False) if self.role == "producer" else matched

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = self.inner.build_connector_meta(scheduler_output)
        if self.role == "consumer" and hasattr(meta, "saves"):
            meta.saves = []
        return meta

    def update_state_after_alloc(self, request: Request, blocks: list[int], n: int) -> None:
        self.inner.update_state_after_alloc(request, blocks, n)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        return self.inner.request_finished(request, block_ids)

    def take_events(self) -> list[KVCacheEvent]:
        return self.inner.take_events()

    def external_token_sources(self, request: Request, end: int | None = None) -> dict[str, int]:
        return self.inner.external_token_sources(request, end)

    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self.inner.register_kv_caches(kv_caches)

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        self.inner.start_load_kv(metadata)

    def wait_for_layer_load(self, layer: int) -> None:
        self.inner.wait_for_layer_load(layer)

    def save_kv_layer(self, layer: int, kv_layer: torch.Tensor, attn_metadata: Any = None,
                      **kwargs: Any) -> None:  # fmt: skip
        self.inner.save_kv_layer(layer, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self.inner.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.inner.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.inner.get_block_ids_with_load_errors()

    def load_error(self, request_id: str) -> str | None:
        return self.inner.load_error(request_id)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def __getattr__(self, name: str) -> Any:  # the inner connector's own extras (store, ...)
        if name == "inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


class RoleEngine(LLMEngine):
    """An ``LLMEngine`` whose connector plays ``kv_role``."""

    def __init__(self, config: EngineConfig, kv_role: str = "both") -> None:
        if kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {', '.join(KV_ROLES)}, got {kv_role!r}")
        self.kv_role = kv_role
        super().__init__(config)

    def _make_connector(self, source: ModelSource) -> KVConnectorBase | None:
        connector = super()._make_connector(source)
        if connector is None or self.kv_role == "both":
            return connector
        return RoleConnector(connector, self.kv_role)
