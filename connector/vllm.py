"""kvstore inside real vLLM: ``KVStoreConnector``, loaded by module path.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "connector.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"url": "kvstore://127.0.0.1:50051"}}'

vLLM builds this class twice, in different processes: with the scheduler role in its
engine core, with the worker role in each worker. Each role wraps the same
``TieredConnector`` our own engine runs (connector/tiered.py), so both engines take one
code path for lookups, load and save plans, verification and recompute on failure. The
roles share nothing but what vLLM carries between them: the step's plan
(``KVStoreConnectorMetadata``, pickled into the scheduler's output) one way, and the
block ids whose load failed (``get_block_ids_with_load_errors``) the other way.

Each role opens its own store from ``kv_connector_extra_config``: ``url`` names a kvstore
daemon (the one tier); any other keys are store config keys, dotted or nested
(``{"tiers": ["disk"], "disk.path": ...}``, docs/store.md). The scheduler looks chunks up
where the worker saves them, so the tiers must be shared between the two processes: a
daemon, Redis/Valkey, or disk. (A cpu tier private to each process would answer every
lookup with a miss.)

vLLM's cache for one layer is the view ``[num_blocks, kv_heads, block_size, 2 * head_dim]``;
its CPU attention kernel lays each (block, head) out by ISA. For ``vec`` (K transposed,
then V) the worker reads and writes it as the engine's ``[blocks, 2, block_size,
kv_heads, head_dim]`` (``SplitLayer``), so vLLM's chunks are ours: the same keys (chained
over KEY_BLOCK tokens, as our engine's) and the same layout, and either engine loads the
other's. Other ISAs' chunks carry a layout name of their own (``cpu_kv_layout``): vLLM to
vLLM only, never wrong KV elsewhere.

Not yet (issue 15): converting the other CPU ISAs' (``amx``, ``vec16``, ``neon``) and CUDA
backends' block layouts; tensor parallelism; P/D hand-off through
``get_finished``; KV events in vLLM's names; stats and Prometheus metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

from connector.base import ConnectorContext
from connector.plan import TieredConnectorMetadata
from connector.tiered import TieredConnector
from kvcore.keys import ModelFingerprint, block_hashes, checkpoint_digest
from store.config import StoreConfig
from store.config_load import flatten

log = logging.getLogger(__name__)

POLICIES = {"recompute": "recompute", "fail": "fail"}
KEY_BLOCK = 16
"""Tokens per block of the hash chain chunk keys are named by: our engine's default block
size, so vLLM and our engine name a chunk alike (vLLM's own block hashes cover 128-token
blocks with another encoding)."""


class _Request:
    """A vLLM request as the connector reads it, with block hashes in our scheme (the
    one key, kvcore/keys.py) over KEY_BLOCK-token blocks, kept up to date incrementally."""

    __slots__ = ("vllm", "hashes")

    def __init__(self, request: Any) -> None:
        self.vllm = request
        self.hashes: list[bytes] = []

    @property
    def block_hashes(self) -> list[bytes]:
        tokens = self.vllm.all_token_ids
        if len(tokens) // KEY_BLOCK > len(self.hashes):
            parent = self.hashes[-1] if self.hashes else None
            salt = self.vllm.cache_salt
            self.hashes += block_hashes(
                tokens, KEY_BLOCK, cache_salt=salt, start=len(self.hashes), parent=parent
            )
        return self.hashes

    def __getattr__(self, name: str) -> Any:  # request_id, prompt_token_ids, ...
        return getattr(self.vllm, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _Request.__slots__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.vllm, name, value)  # kv_transfer_pending (P/D)


class KVStoreConnectorMetadata(KVConnectorMetadata):
    """One step's loads and saves, planned by the scheduler role (pickled to workers)."""

    def __init__(self, plan: TieredConnectorMetadata) -> None:
        self.plan = plan


class _Scheduled:
    """One request's share of a step, as ``TieredConnector.build_connector_meta`` reads it."""

    __slots__ = ("request", "start", "num_new_tokens", "block_ids")

    def __init__(self, request: Any, start: int, num_new_tokens: int, block_ids: list[int]):
        self.request, self.start = request, start
        self.num_new_tokens, self.block_ids = num_new_tokens, block_ids


class _Step:
    def __init__(self, scheduled: list[_Scheduled]) -> None:
        self.scheduled = scheduled


def store_config(extra: dict[str, Any]) -> StoreConfig:
    """The store of ``kv_connector_extra_config``: ``url`` is a daemon as the one tier;
    the connector's own keys (``load_timeout``) are left out."""
    values = flatten(dict(extra))
    values.pop("load_timeout", None)
    url = values.pop("url", None)
    if url is not None:
        if not isinstance(url, str) or not url.startswith("kvstore://"):
            raise ValueError(f"kv_connector_extra_config url: {url!r} is not a kvstore:// url")
        values["tiers"] = [url]
    return StoreConfig.load(overrides=values)


def fingerprint(vllm_config: Any) -> ModelFingerprint:
    """What the KV's bytes depend on, as our engine states it for the same checkpoint."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
        raise ValueError("KVStoreConnector: tensor and pipeline parallelism are not supported yet")
    path = Path(mc.model)
    digest = checkpoint_digest(path) if path.is_dir() else f"hf:{mc.model}@{mc.revision or 'main'}"
    return ModelFingerprint(
        model=path.name,
        weights_digest=digest,
        dtype=str(mc.dtype).removeprefix("torch."),
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=mc.get_num_kv_heads(pc),
        head_dim=mc.get_head_size(),
        kv_layout=cpu_kv_layout(vllm_config),
    )


CONVERTED_ISAS = ("vec",)
"""vLLM CPU attention kernels whose block layout ``SplitLayer`` converts to ours."""


def cpu_isa(vllm_config: Any) -> str:
    """The ISA of vLLM's CPU attention kernel for this model (``amx``, ``vec``, ...)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    mc, cc = vllm_config.model_config, vllm_config.cache_config
    return _get_attn_isa(mc.dtype, cc.block_size, mc.get_head_size(), cc.cache_dtype)


def cpu_kv_layout(vllm_config: Any) -> str:
    """The layout name a chunk saved from vLLM's CPU cache carries in its fingerprint.

    vLLM's CPU attention writes its cache with an ISA-specific kernel, and the rows of a
    block differ by ISA (``vec``: K transposed, then V). Where ``SplitLayer`` converts
    the ISA's layout, chunks are ours (``LTHD``), shared with our engine. Elsewhere the
    bytes are stored as vLLM holds them, under a name of their own, so they load into
    vLLM with the same ISA and block size only: a miss anywhere else, never wrong KV
    (loaded into our engine unconverted, they gave another answer)."""
    isa = cpu_isa(vllm_config)
    if isa in CONVERTED_ISAS:
        return "LTHD"
    return f"vllm-cpu-{isa}-bs{vllm_config.cache_config.block_size}"


def raw_view(cache: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A cache of an ISA ``SplitLayer`` does not convert, as ``[B, 2, N, H, D]`` shaped
    but not ordered like ours: saved and loaded alike, it round-trips within vLLM."""
    blocks, heads, size, width = cache.shape
    if width != 2 * head_dim or not cache.is_contiguous():
        raise ValueError(f"KVStoreConnector: unsupported KV cache layout {tuple(cache.shape)}")
    return cache.view(blocks, heads, 2, size, head_dim).permute(0, 2, 3, 1, 4)


class SplitLayer:
    """One layer of vLLM's CPU cache as the engine's ``[B, 2, N, H, D]``, for the two
    operations the transfers use (``index_copy_`` and ``index_select`` along blocks).

    vLLM's ``vec`` kernel keeps each (block, head) as K transposed, ``[D, N]``, then V,
    ``[N, D]`` (measured: ``ops.cpu_attn_reshape_and_cache``, vllm-cpu 0.32.0), so K and
    V are two strided views with different strides, not one tensor."""

    def __init__(self, cache: torch.Tensor, head_dim: int) -> None:
        blocks, heads, size, width = cache.shape
        if width != 2 * head_dim or not cache.is_contiguous():
            raise ValueError(f"KVStoreConnector: unsupported KV cache layout {tuple(cache.shape)}")
        slabs = cache.view(blocks, heads, 2, size * head_dim)
        self.k = slabs[:, :, 0].view(blocks, heads, head_dim, size).permute(0, 3, 1, 2)
        self.v = slabs[:, :, 1].view(blocks, heads, size, head_dim).permute(0, 2, 1, 3)
        self.device = cache.device

    def index_copy_(self, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
        self.k.index_copy_(dim, index, src[:, 0])
        self.v.index_copy_(dim, index, src[:, 1])

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        return torch.stack((self.k.index_select(dim, index), self.v.index_select(dim, index)), 1)


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM's ``KVConnectorBase_V1`` over a kvstore ``TieredConnector``, one per role."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        extra = dict(tc.kv_connector_extra_config or {})
        mc = vllm_config.model_config
        fp = fingerprint(vllm_config)
        policy = POLICIES[tc.kv_load_failure_policy]
        kv_role = {"kv_producer": "producer", "kv_consumer": "consumer"}.get(tc.kv_role, "both")
        self.context = ConnectorContext(
            fp,
            vllm_config.cache_config.block_size,
            fp.num_layers,
            fp.num_kv_heads,
            fp.head_dim,
            mc.dtype,
            torch.device("cpu"),
            store_config(extra),
            policy,
            float(extra.get("load_timeout", 5.0)),
            kv_role=kv_role,
            hash_block_size=KEY_BLOCK,
        )
        self.inner = TieredConnector(self.context)
        self.requests: dict[str, _Request] = {}  # scheduler: live requests by id
        self.tables: dict[str, list[int]] = {}  # scheduler: block table of each request
        self.layers: dict[str, int] = {}  # worker: layer name -> index
        self.views: list[Any] = []  # worker: each layer in the engine's layout
        self.started = False  # worker: this step's transfers are under way

    # -- scheduler role ---------------------------------------------------------------
    def _view(self, request: Any) -> _Request:
        view = self.requests.get(request.request_id)
        if view is None or view.vllm is not request:
            view = self.requests[request.request_id] = _Request(request)
        return view

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int):
        return self.inner.get_num_new_matched_tokens(self._view(request), num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self.inner.update_state_after_alloc(self._view(request), block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        scheduled = []
        counts = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self.tables[new.req_id] = list(new.block_ids[0])
            scheduled.append(self._scheduled(new.req_id, new.num_computed_tokens, counts))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                self.tables[rid] = list(ids[0]) if ids is not None else []
            elif ids is not None:
                self.tables.setdefault(rid, []).extend(ids[0])
            scheduled.append(self._scheduled(rid, cached.num_computed_tokens[i], counts))
        step = _Step([s for s in scheduled if s is not None])
        return KVStoreConnectorMetadata(self.inner.build_connector_meta(step))

    def _scheduled(self, rid: str, start: int, counts: dict[str, int]) -> _Scheduled | None:
        request = self.requests.get(rid)
        if request is None:  # admitted without a lookup: nothing of it is ours to save
            return None
        return _Scheduled(request, start, counts.get(rid, 0), self.tables.get(rid, []))

    def request_finished(self, request: Any, block_ids: list[int]):
        view = self.requests.pop(request.request_id, None) or _Request(request)
        self.tables.pop(request.request_id, None)
        return self.inner.request_finished(view, block_ids)

    def take_events(self):
        return ()

    # -- worker role ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        order = sorted(kv_caches, key=extract_layer_index)
        self.layers = {name: i for i, name in enumerate(order)}
        split = self.context.fingerprint.kv_layout == "LTHD"  # the ISA's layout converts
        view = SplitLayer if split else raw_view
        self.views = [view(kv_caches[name], self.context.head_dim) for name in order]
        self.inner.register_kv_caches(self.views)

    def _start(self) -> None:
        """Begin this step's transfers once: before the forward pass when it loads (vLLM
        calls ``start_load_kv`` first), else at the first layer's hook."""
        if self.started or not self.has_connector_metadata():
            return
        self.started = True
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        self.inner.start_load_kv(meta.plan)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._start()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._start()
        self.inner.wait_for_layer_load(self.layers[layer_name])

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        self._start()
        i = self.layers[layer_name]
        self.inner.save_kv_layer(i, self.views[i])

    def wait_for_save(self) -> None:
        self._start()
        self.started = False
        self.inner.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]):
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.inner.get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        self.inner.shutdown()
