"""TieredConnector: the engine's KV saved to and loaded from a ``TieredStore``.

Scheduler side: on admission, the store's longest stored prefix of the prompt (whole
chunks, keys from ``kvcore.keys.chunk_refs`` bound to the model fingerprint) beyond the
engine's own prefix-cache hits becomes external tokens; each step's metadata lists the
loads planned at admission and the whole prompt chunks that step completes. Networked
tiers are looked up off the engine loop (``connector/lookup.py``): until they answer, or
their deadline passes, the request is "not yet" (``None``) and others are scheduled.

Worker side (``connector/transfer.py``): each request's chunks are fetched into staging
buffers and verified on the store's executor, which then writes them into the paged
cache layer by layer; layer i's attention waits for layer i only. Saves copy each
layer's blocks out right after its attention, and one ``put_async`` per step sends the
whole chunks. A load that fails or misses its deadline leaves the rest of the request
to recompute (``recompute``) or fails it (``fail``).

Roles (``context.kv_role``): a ``producer`` still looks its prompts up (chunks already
stored need no save) but loads nothing; a ``consumer`` plans no saves. Disaggregated
prefill/decode (``kv_transfer_params``) is ``connector/disagg.py``.

KV events (``connector/residency.py``): the store reports every chunk a tier stores or
drops (saves, promotions, demotions, evictions); described chunks become ``BlockStored``
/ ``BlockRemoved`` with the tier as medium.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import torch

from connector.base import ConnectorContext, KVConnectorBase
from connector.disagg import (
    RemoteDecode,
    TransferAgent,
    wants_remote_decode,
    wants_remote_prefill,
)
from connector.handoff_policy import HandOffPolicy
from connector.lookup import StoreLookups
from connector.plan import RequestState, TieredConnectorMetadata, plan_load, plan_saves
from connector.residency import ChunkInfo, ChunkResidency
from connector.staging import StagingPool
from connector.transfer import LoadResult, StepTransfers
from kvcore.events import KVCacheEvent
from kvcore.keys import ChunkRef, chunk_refs
from store.config import resolve_store_config
from store.tiered import PutResult, TieredStore

if TYPE_CHECKING:
    from connector.views import ConnectorRequest, ConnectorStep

log = logging.getLogger(__name__)


class TieredConnector(KVConnectorBase):
    """A connector over one ``TieredStore`` built from ``context.kv_config``."""

    def __init__(self, context: ConnectorContext, store: TieredStore | None = None) -> None:
        super().__init__(context)
        config = store.config if store is not None else resolve_store_config(context.kv_config)
        for what, n in (("block_size", context.block_size), ("hash block", context.key_block_size)):
            if config.chunk_size % n:
                raise ValueError(
                    f"store chunk_size {config.chunk_size} is not a multiple of the engine's "
                    f"{what} {n}"
                )
        self.store = store if store is not None else TieredStore(config, context.fingerprint)
        self.chunk_size = config.chunk_size
        self._requests: dict[str, RequestState] = {}
        self._load_failed: dict[str, int] = {}  # request id -> first token to recompute
        self._puts: list[tuple[Future, list[str]]] = []
        self.residency: ChunkResidency | None = None
        if context.enable_kv_events:
            self.residency = ChunkResidency(context.block_size)
            self.store.subscribe(self.residency.on_store_event)
        self._kv_caches: list[torch.Tensor] = []
        self._load_stream: torch.cuda.Stream | None = None
        self._staging: StagingPool | None = None
        self._step: StepTransfers | None = None
        self._failed_blocks: set[int] = set()
        self.last_load_results: list[LoadResult] = []
        self.transfers = TransferAgent(self.store, self.chunk_size)
        self._req_puts: dict[str, list[Future]] = {}  # prefill legs' puts, by request id
        self.lookups = StoreLookups(self.store, context.load_timeout)

    # -- scheduler side ---------------------------------------------------------------
    def chunk_refs(self, request: ConnectorRequest, decoded: bool = False) -> list[ChunkRef]:
        """The store chunks of ``request``'s prompt, or with ``decoded`` of all its tokens
        so far (whole chunks only)."""
        hb = self.context.key_block_size
        hashes = request.block_hashes
        if not decoded:
            hashes = hashes[: len(request.prompt_token_ids) // hb]
        return chunk_refs(
            hashes, hb, self.chunk_size, self.context.fingerprint, cache_salt=request.cache_salt
        )

    def _state(self, request: ConnectorRequest) -> RequestState:
        st = self._requests.get(request.request_id)
        if st is None:
            st = self._requests[request.request_id] = RequestState(self.chunk_refs(request))
            params = request.kv_transfer_params
            if wants_remote_decode(params):
                self._req_puts[request.request_id] = []
            elif wants_remote_prefill(params):
                expires = params.get("lease_expires")
                if isinstance(expires, (int, float)) and expires < time.time():
                    log.info(
                        "request %s: its KV lease expired; loading what the store still "
                        "holds (keys are content-addressed)",
                        request.request_id,
                    )
        return st

    def get_num_new_matched_tokens(
        self, request: ConnectorRequest, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        st = self._state(request)
        tiers = self._locate(request, st)
        if tiers is None:  # a networked tier is still being asked: not yet
            return None, False
        st.tiers = tiers
        st.saved_upto = max(st.saved_upto, st.stored_end)  # stored chunks need no save
        # A load must leave one prompt token to compute (its step yields the next token),
        # and need leave no more: it may end mid-chunk and mid-block. A prompt found whole
        # then computes its last token alone, as a decode step over the loaded KV.
        st.hit_end = min(st.stored_end, request.num_tokens - 1)
        if self.context.kv_role == "producer":  # a producer computes every prompt itself
            st.hit_end = 0
            return 0, False
        return max(0, st.hit_end - num_computed_tokens), False

    def _locate(self, request: ConnectorRequest, st: RequestState) -> list[str] | None:
        """The tier of each leading stored chunk of ``request``, or None while the
        networked tiers' part of the lookup runs (``connector/lookup.py``). Local tiers
        answer at once; an answer is kept until the request is admitted."""
        if st.lookup is None:
            keys = [r.key for r in st.refs]
            local = self.store.locate(keys, local_only=True)
            rid = request.request_id
            st.lookup = self.lookups.start(keys, local, lambda: self._requests.get(rid) is st)
            if st.lookup is None:
                return local
        return self.lookups.answer(st.lookup)

    def update_state_after_alloc(
        self, request: ConnectorRequest, block_ids: list[int], num_external_tokens: int
    ) -> None:
        st = self._state(request)
        st.lookup = None  # a later admission (after a preemption) looks up anew
        st.load, st.load_start, st.load_end = None, 0, 0
        if num_external_tokens <= 0:
            return
        end = st.hit_end
        st.load_start, st.load_end = end - num_external_tokens, end
        st.load = plan_load(st, request.request_id, block_ids, st.load_start, end)
        if self.residency is not None:  # a load promotes its chunks: describe them
            for key, start in zip(st.load.keys, st.load.chunk_starts, strict=True):
                self.residency.describe(key, self._chunk_info(request, start))

    def build_connector_meta(self, scheduler_output: ConnectorStep) -> TieredConnectorMetadata:
        meta = TieredConnectorMetadata()
        bs = self.context.block_size
        for rid, good_end in self._load_failed.items():  # resave what recomputes
            st = self._requests.get(rid)
            if st is not None:
                st.saved_upto = min(st.saved_upto, good_end - good_end % self.chunk_size)
        self._load_failed.clear()
        for s in scheduler_output.scheduled:
            st = self._requests.get(s.request.request_id)
            if st is None:
                continue
            if st.load is not None:
                meta.loads.append(st.load)
                st.load = None
            if (
                self.context.save_decoded
                and len(s.request.block_hashes) * self.context.key_block_size
                >= st.refs_end + self.chunk_size
            ):
                st.refs = self.chunk_refs(
                    s.request, decoded=True
                )  # generated tokens filled a chunk
            if self.context.kv_role == "consumer":  # a consumer only loads
                continue
            saves = plan_saves(
                st, s.request.request_id, s.block_ids, s.start + s.num_new_tokens, bs
            )
            for spec in saves if self.residency is not None else ():
                self.residency.describe(spec.key, self._chunk_info(s.request, spec.start))
            meta.saves += saves
        return meta

    def _chunk_info(self, request: ConnectorRequest, start: int) -> ChunkInfo:
        """The blocks and tokens of ``request``'s chunk starting at token ``start``."""
        hb, end = self.context.key_block_size, start + self.chunk_size
        hashes = request.block_hashes[start // hb : end // hb]
        parent = request.block_hashes[start // hb - 1] if start else None
        return ChunkInfo(list(hashes), parent, list(request.all_token_ids[start:end]))

    def request_finished(
        self, request: ConnectorRequest, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Saves were copied out of the paged cache during the steps: the blocks may go now.
        rid = request.request_id
        st = self._requests.pop(rid, None)
        futures = self._req_puts.pop(rid, None)
        params = request.kv_transfer_params
        if wants_remote_prefill(params) and params.get("lease_id"):
            self.transfers.release_async(params.get("remote_store"), params["lease_id"])
        if futures is not None and st is not None and request.output_token_ids:
            # A prefill leg that ran (not an abort): hand its KV over, off the engine loop.
            ttl = self.transfers.policy.lease_ttl(params.get("lease_ttl"))  # capped
            handle = RemoteDecode(
                rid,
                [r.key for r in st.refs],
                params.get("remote_store"),
                ttl,
                self.context.load_timeout,
                futures,
            )
            request.kv_transfer_pending = handle
        return False, None

    @property
    def handoff_policy(self) -> HandOffPolicy:
        """What ``kv_transfer_params`` may ask of this engine (``check_params``)."""
        return self.transfers.policy

    def finish_remote_decode(self, handle: RemoteDecode) -> dict[str, Any]:
        """The ``kv_transfer_params`` of a finished prefill leg (blocking; see
        ``connector/disagg.py``)."""
        return self.transfers.finish(handle)

    def external_token_sources(
        self, request: ConnectorRequest, end: int | None = None
    ) -> dict[str, int]:
        st = self._requests.get(request.request_id)
        return st.sources(end) if st is not None else {}

    def take_events(self) -> list[KVCacheEvent]:
        """``BlockStored`` / ``BlockRemoved`` of the store's tiers for the chunks this
        connector saved or loaded (only with ``context.enable_kv_events``)."""
        self._reap_puts()
        return self.residency.take_events() if self.residency is not None else []

    def _reap_puts(self) -> None:
        """Forget the descriptions of chunks whose save stored them nowhere."""
        done = [(f, keys) for f, keys in self._puts if f.done()]
        self._puts = [(f, keys) for f, keys in self._puts if not f.done()]
        for fut, keys in done if self.residency is not None else ():
            result = None if fut.exception() is not None else fut.result()
            stored = result.stored if isinstance(result, PutResult) else [False] * len(keys)
            self.residency.forget_unstored(
                [k for k, ok in zip(keys, stored, strict=True) if not ok]
            )

    # -- worker side ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self._kv_caches = list(kv_caches)
        device = self._kv_caches[0].device if self._kv_caches else None
        if device is not None and device.type == "cuda":  # loads copy on a side stream
            self._load_stream = torch.cuda.Stream(device)
        elif device is not None:  # host staging: reused, not allocated per step
            c = self.context
            shape = (c.num_layers, 2, self.chunk_size, c.num_kv_heads, c.head_dim)
            self._staging = StagingPool(shape, c.dtype)

    def start_load_kv(self, metadata: TieredConnectorMetadata) -> None:
        self._failed_blocks = set()
        self.last_load_results = []
        if not metadata.loads and not metadata.saves:
            self._step = None
            return
        self._step = StepTransfers(
            self.context,
            self.store,
            self.chunk_size,
            self._kv_caches,
            metadata,
            self._load_stream,
            self._staging,
        )
        self._step.start_saves()
        self._step.start_loads()

    def wait_for_layer_load(self, layer: int) -> None:
        if self._step is not None and self._step.jobs:
            self._step.wait_layer(layer)

    def save_kv_layer(
        self, layer: int, kv_layer: torch.Tensor, attn_metadata: Any = None, **kwargs: Any
    ) -> None:
        step = self._step
        if step is not None and step.meta.saves:
            step.save_layer(layer, kv_layer, step.failed_ids())

    def wait_for_save(self, discard: bool = False) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        self._record_failures(step.finish_loads())
        failed = {r.spec.request_id for r in self.last_load_results if r.error is not None}
        if discard:  # a failed forward pass: every save of the step would hold garbage
            failed |= {s.request_id for s in step.meta.saves}
        if step.meta.saves:  # the saves of a request whose load failed hold wrong KV
            build, specs = step.finish_saves(failed)
            if specs:
                fut = self.store.put_async(build)
                self._puts.append((fut, [s.key for s in specs]))
                for rid in {s.request_id for s in specs} & self._req_puts.keys():
                    self._req_puts[rid].append(fut)
            skipped = [s.key for s in step.meta.saves if s.request_id in failed]
            if skipped and self.residency is not None:
                self.residency.forget_unstored(skipped)
        self._reap_puts()

    def _record_failures(self, results: list[LoadResult]) -> None:
        self.last_load_results = results
        bs = self.context.block_size
        for r in results:
            if r.error is None:
                continue
            if self.context.load_failure_policy == "fail":
                log.error("kv load for %s failed: %s", r.spec.request_id, r.error)
            self._failed_blocks.update(r.spec.block_ids[r.good_end // bs : r.spec.end // bs])
            self._load_failed[r.spec.request_id] = r.good_end

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self._failed_blocks)

    def load_error(self, request_id: str) -> str | None:
        """Why the last step's load for ``request_id`` stopped short (None: it did not)."""
        return next(
            (r.error for r in self.last_load_results if r.spec.request_id == request_id), None
        )

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every save handed to the store so far is stored (tests, shutdown)."""
        wait([f for f, _ in self._puts], timeout=timeout)

    def shutdown(self) -> None:
        self.lookups.close()
        self.flush()
        self.transfers.close()
        self.store.close()
