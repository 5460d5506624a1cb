"""The connector API between the engine and external KV storage, and the registry by name.

Shaped like vLLM's ``KVConnectorBase_V1`` so that a thin adapter could serve real vLLM:

* scheduler side (no tensors): ``get_num_new_matched_tokens`` -> ``update_state_after_alloc``
  -> ``build_connector_meta`` once per step -> ``request_finished``; ``take_events``.
* worker side (tensors): ``register_kv_caches`` once, then per step ``start_load_kv(meta)``,
  per layer ``wait_for_layer_load(i)`` / attention / ``save_kv_layer(i, ...)``, then
  ``wait_for_save``; ``get_block_ids_with_load_errors`` after the step.

This engine runs both sides in one process, so one object plays both roles. Differences
from vLLM, kept deliberately small: layers are named by index rather than by module name,
``start_load_kv`` takes the metadata directly (vLLM binds it first and passes a forward
context), and ``kv_caches`` is a list indexed by layer.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from connector.handoff_policy import HandOffPolicy
    from connector.views import ConnectorRequest, ConnectorStep
    from kvcore.events import KVCacheEvent
    from kvcore.keys import ModelFingerprint

LOAD_FAILURE_POLICIES = ("recompute", "fail")


class KVConnectorMetadata:  # noqa: B903 - a marker base, as in vLLM
    """What the scheduler side tells the worker side about one step (loads, saves)."""


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """Everything a connector needs from the engine, fixed for the engine's lifetime.

    ``kv_config`` is the connector's own configuration (for ``tiered``: a store YAML path,
    a mapping of store keys, or a ``StoreConfig``; ``None`` for the store's defaults).
    """

    fingerprint: ModelFingerprint
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    kv_config: Any = None
    load_failure_policy: str = "recompute"
    load_timeout: float = 5.0  # seconds a step waits for its loads before recomputing
    enable_kv_events: bool = False  # keep events for take_events()
    save_decoded: bool = False  # also save chunks of generated tokens (multi-turn reuse)
    kv_role: str = "both"  # producer: save only (no loads), consumer: load only (no saves)
    hash_block_size: int = 0  # tokens per entry of request.block_hashes (0: block_size)

    @property
    def key_block_size(self) -> int:
        """Tokens per block hash the chunk keys chain over (``hash_block_size`` or, when
        0, the cache's ``block_size``): equal across engines, so they share chunks."""
        return self.hash_block_size or self.block_size


class KVConnectorBase(ABC):
    """Base class of connectors; see the module docstring for the call order."""

    def __init__(self, context: ConnectorContext) -> None:
        self.context = context

    @property
    def handoff_policy(self) -> HandOffPolicy | None:
        """What ``kv_transfer_params`` may ask of this engine (its allow-list of stores,
        its lease limits: connector/handoff_policy.py); None: a connector without P/D."""
        return None

    # -- scheduler side ---------------------------------------------------------------
    @abstractmethod
    def get_num_new_matched_tokens(
        self, request: ConnectorRequest, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens of ``request`` beyond ``num_computed_tokens`` (the engine's own prefix-cache
        hits) that the connector can load, and whether the load is asynchronous (between
        steps; always False here). The count must leave at least one prompt token to
        compute. Called again for a request that could not be admitted, so it must not
        commit anything.

        ``None`` means "still looking it up; ask again next step" (as in vLLM): the
        scheduler skips ``request`` this step, keeping its place in the queue, and
        schedules the others. A connector that answers ``None`` bounds how long it does.
        Runs on the engine loop: it must not wait on anything remote.
        """

    @abstractmethod
    def update_state_after_alloc(
        self, request: ConnectorRequest, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """``request`` was admitted: ``block_ids`` is its whole block table and the
        ``num_external_tokens`` tokens after its engine-cached prefix are to be loaded into
        those blocks in the next step (0: nothing to load)."""

    @abstractmethod
    def build_connector_meta(self, scheduler_output: ConnectorStep) -> KVConnectorMetadata:
        """The loads and saves of the step just scheduled; resets the per-step state.
        Must not modify ``scheduler_output``."""

    def request_finished(
        self, request: ConnectorRequest, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Called once when ``request`` finishes, before its blocks are freed. Returns
        whether the connector holds the blocks until ``get_finished`` reports the request
        (an asynchronous send), and ``kv_transfer_params`` for the response."""
        return False, None

    def take_events(self) -> list[KVCacheEvent]:
        """KV events (blocks stored in / removed from the connector's media) since the
        last call."""
        return []

    def external_token_sources(
        self, request: ConnectorRequest, end: int | None = None
    ) -> dict[str, int]:
        """How many of the tokens planned for loading (up to token ``end``) each medium
        serves, e.g. ``{"cpu": 64, "disk": 32}``; for per-request metrics."""
        return {}

    # -- worker side ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        """The engine's per-layer paged caches ``[num_blocks, 2, block_size, KVH, D]``."""
        return None

    @abstractmethod
    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        """Start this step's loads (asynchronously); called before the forward pass."""

    @abstractmethod
    def wait_for_layer_load(self, layer: int) -> None:
        """Block until layer ``layer``'s KV of this step's loads is in the paged cache
        (or has failed); called just before that layer's attention."""

    @abstractmethod
    def save_kv_layer(
        self, layer: int, kv_layer: torch.Tensor, attn_metadata: Any = None, **kwargs: Any
    ) -> None:
        """Start saving this step's KV of layer ``layer`` from ``kv_layer`` (its paged
        cache); called just after that layer's attention wrote its new KV."""

    @abstractmethod
    def wait_for_save(self, discard: bool = False) -> None:
        """Called after the forward pass: when this returns, the saves no longer read the
        paged cache, so its blocks may be overwritten. ``discard``: the pass failed part
        way, so this step's saves hold layers never computed; store none of them."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Ids of requests whose asynchronous sending / receiving completed."""
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks of the last step whose load failed (their KV is wrong: recompute it)."""
        return set()

    def load_error(self, request_id: str) -> str | None:
        """Why the last step's load for ``request_id`` failed (None: it did not)."""
        return None

    def shutdown(self) -> None:
        """Finish queued work (pending saves) and release resources."""
        return None


ConnectorFactory = Callable[[ConnectorContext], KVConnectorBase]

REGISTRY: dict[str, tuple[str, str] | None] = {
    "none": None,  # no connector: the engine runs exactly as without this module
    "tiered": ("connector.tiered", "TieredConnector"),
}
"""Connector name -> (module, class), imported on first use."""


def connector_names() -> list[str]:
    return sorted(REGISTRY)


def create_connector(name: str, context: ConnectorContext) -> KVConnectorBase | None:
    """The connector registered as ``name`` (``None`` for ``none``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown kv connector {name!r}; known: {', '.join(connector_names())}")
    entry = REGISTRY[name]
    if entry is None:
        return None
    module, cls = entry
    return getattr(importlib.import_module(module), cls)(context)
