"""The tiered connector's worker side: chunk loads into, and saves out of, the paged cache.

Loads go through host staging buffers, never straight into the paged cache: a load that
times out keeps running on the store's executor, and must then scribble on memory
nobody reads rather than on blocks the engine is recomputing. Saves copy each layer's
blocks into a staging chunk on the cache's device right after that layer's attention (a
device memcpy: the forward pass waits for no I/O and no host sync), and the whole chunks
go to the host and then to the store in one ``put_async`` when the step ends.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from connector.base import ConnectorContext
from connector.plan import LoadSpec, SaveSpec, TieredConnectorMetadata
from store.chunk import Chunk, to_tensor
from store.tiered import TieredStore

log = logging.getLogger(__name__)
HOST = torch.device("cpu")


@dataclass(slots=True)
class _Copy:
    """Tokens ``[lo, hi)`` of one staged chunk go into paged blocks ``block_ids``."""

    chunk: torch.Tensor  # [L, 2, chunk_tokens, KVH, D]
    lo: int  # offsets inside the chunk
    hi: int
    block_ids: torch.Tensor  # [(hi - lo) / block_size] long, on the cache's device


@dataclass(slots=True)
class LoadResult:
    """How one request's load ended: tokens before ``good_end`` are in the cache."""

    spec: LoadSpec
    good_end: int
    error: str | None  # why the load stopped short, None when it is complete


@dataclass(slots=True)
class _InFlight:
    spec: LoadSpec
    staging: list[torch.Tensor]
    future: Future


@dataclass(slots=True)
class StepTransfers:
    """The loads and saves of one step, driven by the layer hooks."""

    ctx: ConnectorContext
    store: TieredStore
    chunk_size: int
    kv_caches: list[torch.Tensor]
    meta: TieredConnectorMetadata
    started: float = field(default_factory=time.monotonic)
    inflight: list[_InFlight] = field(default_factory=list)
    copies: list[_Copy] | None = None  # None until the loads are resolved
    results: list[LoadResult] = field(default_factory=list)
    save_staging: dict[str, torch.Tensor] = field(default_factory=dict)

    def chunk_shape(self, tokens: int) -> tuple[int, ...]:
        c = self.ctx
        return (c.num_layers, 2, tokens, c.num_kv_heads, c.head_dim)

    # -- loads ----------------------------------------------------------------------
    def start_loads(self) -> None:
        for spec in self.meta.loads:
            staging = [
                torch.empty(self.chunk_shape(self.chunk_size), dtype=self.ctx.dtype)
                for _ in spec.keys
            ]
            self.inflight.append(_InFlight(spec, staging, self.store.get_async(spec.keys, staging)))

    def resolve_loads(self) -> None:
        """Wait (until the step's deadline) for every load; plan the per-layer copies."""
        self.copies = []
        deadline = self.started + self.ctx.load_timeout
        for job in self.inflight:
            chunks, error = self._wait(job, deadline)
            spec, good_end = job.spec, job.spec.start
            for i, chunk in enumerate(chunks):
                staged = self._usable(chunk)
                if staged is None:
                    error = error or f"chunk {spec.keys[i][:12]} missing or unusable"
                    break
                c_start = spec.chunk_starts[i]
                lo, hi = max(spec.start, c_start), min(spec.end, c_start + self.chunk_size)
                bs = self.ctx.block_size
                ids = torch.tensor(
                    spec.block_ids[lo // bs : hi // bs], device=self.kv_caches[0].device
                )
                self.copies.append(_Copy(staged, lo - c_start, hi - c_start, ids))
                good_end = hi
            if good_end < spec.end and error is None:
                error = "store returned fewer chunks than asked"
            if error is not None:
                log.warning("kv load for %s stopped at token %d of %d: %s", spec.request_id,
                            good_end, spec.end, error)  # fmt: skip
            self.results.append(LoadResult(spec, good_end, error))

    def _wait(self, job: _InFlight, deadline: float) -> tuple[list[Chunk | None], str | None]:
        try:
            return job.future.result(timeout=max(0.0, deadline - time.monotonic())), None
        except FutureTimeout:
            job.future.cancel()  # if still queued; a running get only writes to staging
            return [], f"timed out after {self.ctx.load_timeout}s"
        except Exception as exc:  # a tier failing in an unexpected way is still a miss
            return [], f"{type(exc).__name__}: {exc}"

    def _usable(self, chunk: Chunk | None) -> torch.Tensor | None:
        """The chunk's KV as ``[L, 2, T, KVH, D]`` in the engine's dtype, or None."""
        if chunk is None:
            return None
        expected = self.chunk_shape(self.chunk_size)
        if tuple(chunk.header.shape) != expected or chunk.header.dtype != str(
            self.ctx.dtype
        ).removeprefix("torch."):
            return None
        return to_tensor(chunk)  # views ``staging`` when the tier read into it

    def load_layer(self, layer: int) -> None:
        """Write layer ``layer`` of every loaded chunk into its paged blocks."""
        if self.copies is None:
            self.resolve_loads()
        kv = self.kv_caches[layer]
        bs = self.ctx.block_size
        for c in self.copies or ():
            src = c.chunk[layer, :, c.lo : c.hi]  # [2, n, KVH, D]
            src = src.reshape(2, -1, bs, *src.shape[2:]).transpose(0, 1)  # [nb, 2, BS, KVH, D]
            kv.index_copy_(0, c.block_ids, src.to(kv.device, non_blocking=True))

    # -- saves ----------------------------------------------------------------------
    def save_layer(self, layer: int, kv_layer: torch.Tensor, skip: set[str]) -> None:
        bs = self.ctx.block_size
        for spec in self.meta.saves:
            if spec.request_id in skip:
                continue
            staging = self.save_staging.get(spec.key)
            if staging is None:  # on the cache's device: a GPU copies without a host sync
                shape = self.chunk_shape(spec.end - spec.start)
                staging = torch.empty(shape, dtype=self.ctx.dtype, device=kv_layer.device)
                self.save_staging[spec.key] = staging
            ids = torch.tensor(spec.block_ids, device=kv_layer.device)
            blocks = kv_layer.index_select(0, ids)  # [nb, 2, BS, KVH, D]
            dst = staging[layer].view(2, len(spec.block_ids), bs, *staging.shape[3:])
            dst.copy_(blocks.transpose(0, 1))

    def finish_saves(self, skip: set[str]) -> tuple[list[Chunk], list[SaveSpec]]:
        """The staged chunks to put (saves of requests in ``skip`` are dropped)."""
        chunks, specs = [], []
        for spec in self.meta.saves:
            staging = self.save_staging.get(spec.key)
            if staging is None or spec.request_id in skip:
                continue
            kv = staging.to(HOST)  # one device-to-host copy per chunk, after the forward pass
            chunks.append(self.store.make_chunk(spec.key, kv, spec.end - spec.start))
            specs.append(spec)
        return chunks, specs
