"""The tiered connector's worker side: chunk loads into, and saves out of, the paged cache.

Loads, layer by layer::

    store executor thread                     engine thread (forward pass)
    get chunks into staging, verify them      start_load_kv
    layer 0 of each chunk ready               wait_for_layer_load(0) -> attention 0
    layer 1 ...           ready               wait_for_layer_load(1) -> attention 1
    ...                                       ...

``TieredStore.get_layers_async`` fetches and verifies a request's chunks and hands them
over one layer at a time, so layer i's attention waits for layer i only. On CUDA each
layer's copy into the paged cache (the scatter) runs on the store's thread, on a side
stream from pinned staging, and ``wait_for_layer_load(i)`` makes the compute stream
wait for layer i's event. On the CPU the engine thread scatters layer i itself inside
``wait_for_layer_load(i)``: a store thread copying while the forward pass runs took a
core from torch's two compute threads, which then waited for each other at every op
(measured: a 4k-token warm TTFT from the cpu tier went from 0.135 s to 0.096 s).

Loads go through staging buffers, never straight from a tier into the paged cache: a
load that times out keeps running on the store's executor and must then scribble on
memory nobody reads. Once a step gives up on a load (its deadline passed) the job is
cancelled under its lock, so no later layer is written into blocks the engine is
recomputing. Saves copy each layer's blocks into a staging chunk on the cache's device
right after that layer's attention (a device memcpy: the forward pass waits for no I/O
and no host sync), and the whole chunks go to the host and then to the store in one
``put_async`` when the step ends.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from connector.base import ConnectorContext
from connector.plan import LoadSpec, SaveSpec, TieredConnectorMetadata
from connector.staging import StagingPool
from kvcore.chunk import Chunk, to_tensor
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
class _LoadJob:
    """One request's load. The store's thread plans and scatters; the engine thread
    waits per layer. Every field below ``cond`` is guarded by it."""

    spec: LoadSpec
    staging: list[torch.Tensor]
    cond: threading.Condition = field(default_factory=threading.Condition)
    copies: list[_Copy] | None = None  # planned once the chunks are back and verified
    good_end: int = 0
    error: str | None = None
    layers_done: int = 0  # layers [0, layers_done) are in the paged cache
    layers_staged: int = 0  # CPU: layers [0, layers_staged) verified, for the engine to copy
    step_done: bool = False  # the step ended: the engine reads the staging no more
    released: bool = False  # the staging went back to the pool
    cancelled: bool = False  # the step gave up: write nothing more
    finished: bool = False  # the store's job ended, one way or another
    layer_events: list = field(default_factory=list)  # CUDA: one event per scattered layer
    future: Future | None = None

    def ready(self, layer: int) -> bool:
        return max(self.layers_done, self.layers_staged) > layer or self.finished or self.cancelled


@dataclass(slots=True)
class StepTransfers:
    """The loads and saves of one step, driven by the layer hooks."""

    ctx: ConnectorContext
    store: TieredStore
    chunk_size: int
    kv_caches: list[torch.Tensor]
    meta: TieredConnectorMetadata
    stream: torch.cuda.Stream | None = None  # CUDA: the side stream loads are copied on
    pool: StagingPool | None = None  # CPU: load staging reused across steps
    started: float = field(default_factory=time.monotonic)
    jobs: list[_LoadJob] = field(default_factory=list)
    save_staging: dict[str, torch.Tensor] = field(default_factory=dict)
    save_ids: dict[str, torch.Tensor] = field(default_factory=dict)

    def chunk_shape(self, tokens: int) -> tuple[int, ...]:
        c = self.ctx
        return (c.num_layers, 2, tokens, c.num_kv_heads, c.head_dim)

    # -- loads: the engine thread -----------------------------------------------------
    def start_loads(self) -> None:
        if self.stream is not None:  # blocks may be in use by work queued before this step
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        pin = self.stream is not None
        for spec in self.meta.loads:
            if self.pool is not None:
                staging = self.pool.take(len(spec.keys))
            else:
                shape = self.chunk_shape(self.chunk_size)
                staging = [
                    torch.empty(shape, dtype=self.ctx.dtype, pin_memory=pin) for _ in spec.keys
                ]
            job = _LoadJob(spec, staging, good_end=spec.start)
            job.future = self.store.get_layers_async(
                spec.keys, staging, functools.partial(self._on_layer, job)
            )
            job.future.add_done_callback(functools.partial(self._on_done, job))
            self.jobs.append(job)

    def wait_layer(self, layer: int) -> None:
        """Return once layer ``layer`` of every load is in the paged cache, or its load
        has failed or missed the step's deadline (then it is cancelled)."""
        deadline = self.started + self.ctx.load_timeout
        for job in self.jobs:
            with job.cond:
                in_time = job.cond.wait_for(
                    lambda job=job: job.ready(layer), max(0.0, deadline - time.monotonic())
                )
                if not in_time:
                    self._give_up(job, f"timed out after {self.ctx.load_timeout}s")
                elif job.layers_done == layer < job.layers_staged and not job.cancelled:
                    with torch.inference_mode():  # CPU: the engine thread copies the layer
                        self._scatter(job.copies, layer)
                    job.layers_done = layer + 1
                if in_time and job.layers_done <= layer and job.error is None:
                    self._give_up(job, f"load stopped before layer {layer}")
                if job.layers_done > layer and job.layer_events:
                    torch.cuda.current_stream(self.stream.device).wait_event(
                        job.layer_events[layer]
                    )

    def finish_loads(self) -> list[LoadResult]:
        """End the step's loads (any still running is cancelled); how each one ended."""
        results = []
        for job in self.jobs:
            with job.cond:
                if not job.finished and job.layers_done < self.ctx.num_layers:
                    self._give_up(job, "the step ended before the load")
                job.step_done = True
                self._release_staging(job)
                results.append(LoadResult(job.spec, job.good_end, job.error))
            if job.error is not None:
                log.warning(
                    "kv load for %s stopped at token %d of %d: %s",
                    job.spec.request_id,
                    job.good_end,
                    job.spec.end,
                    job.error,
                )
        return results

    def failed_ids(self) -> set[str]:
        """Requests whose load has failed so far in this step. Read without the jobs'
        locks (a save must not wait for a scatter): a failure seen late only costs a
        wasted copy, ``finish_loads`` has the final word."""
        return {job.spec.request_id for job in self.jobs if job.error is not None}

    def _give_up(self, job: _LoadJob, why: str) -> None:
        """(job.cond held) Nothing of this load counts; nothing more is written."""
        job.cancelled = True
        job.good_end = job.spec.start
        job.error = job.error or why
        if job.future is not None:
            job.future.cancel()  # if still queued; a running get only writes to staging

    # -- loads: the store's thread ----------------------------------------------------
    def _on_layer(self, job: _LoadJob, layer: int, chunks: list[Chunk | None]) -> bool:
        """Scatter layer ``layer`` of the verified chunks; False stops the job."""
        with job.cond, torch.inference_mode(), self._stream_ctx():
            if job.cancelled:
                return False
            if job.copies is None:
                self._plan(job, chunks)
            if not job.copies:
                return False
            if self.stream is None:  # CPU: verified and staged; the engine thread copies it
                job.layers_staged = layer + 1
                job.cond.notify_all()
                return True
            self._scatter(job.copies, layer)
            event = torch.cuda.Event()
            event.record(self.stream)
            job.layer_events.append(event)
            job.layers_done = layer + 1
            job.cond.notify_all()
            return True

    def _on_done(self, job: _LoadJob, future: Future) -> None:
        try:
            self._end_job(job, future)
        finally:
            with job.cond:
                self._release_staging(job)

    def _release_staging(self, job: _LoadJob) -> None:
        """(job.cond held) Back to the pool once nothing can touch the staging: the
        store's job has ended (it writes into it) and so has the step (the engine thread
        copies from it on the CPU)."""
        if self.pool is not None and job.finished and job.step_done and not job.released:
            job.released = True
            self.pool.give(job.staging)

    def _end_job(self, job: _LoadJob, future: Future) -> None:
        with job.cond:
            job.finished = True
            if future.cancelled():
                job.error = job.error or "cancelled"
            elif future.exception() is not None:  # a tier failing oddly is still a miss
                exc = future.exception()
                if job.copies is None:
                    job.error = job.error or f"{type(exc).__name__}: {exc}"
                elif max(job.layers_done, job.layers_staged) < self.ctx.num_layers:
                    self._give_up(job, f"{type(exc).__name__}: {exc}")
            elif job.copies is None:  # no chunk came back: no layer was delivered
                with torch.inference_mode(), self._stream_ctx():
                    self._plan(job, future.result())
            job.cond.notify_all()

    def _plan(self, job: _LoadJob, chunks: list[Chunk | None]) -> None:
        """(job.cond held) The copies of the leading usable chunks; where the load ends."""
        spec, bs = job.spec, self.ctx.block_size
        job.copies = []
        for i, key in enumerate(spec.keys):
            staged = self._usable(chunks[i] if i < len(chunks) else None)
            if staged is None:
                job.error = job.error or f"chunk {key[:12]} missing or unusable"
                break
            c_start = spec.chunk_starts[i]
            lo, hi = max(spec.start, c_start), min(spec.end, c_start + self.chunk_size)
            # Whole blocks: a load ending mid-block fills that block's tail too, with the
            # stored KV of tokens this step computes anyway (their own writes come after
            # this layer's scatter, so the engine's values are the ones attended to).
            top = min(-(-hi // bs) * bs, c_start + self.chunk_size)
            ids = torch.tensor(
                spec.block_ids[lo // bs : top // bs], device=self.kv_caches[0].device
            )
            job.copies.append(_Copy(staged, lo - c_start, top - c_start, ids))
            job.good_end = hi

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

    def _scatter(self, copies: list[_Copy], layer: int) -> None:
        """Write layer ``layer`` of every planned copy into its paged blocks."""
        kv = self.kv_caches[layer]
        bs = self.ctx.block_size
        for c in copies:
            whole = c.chunk[layer].to(kv.device, non_blocking=True)  # [2, T, KVH, D]; contiguous
            src = whole[:, c.lo : c.hi]
            src = src.reshape(2, -1, bs, *src.shape[2:]).transpose(0, 1)  # [nb, 2, BS, KVH, D]
            kv.index_copy_(0, c.block_ids, src)

    def _stream_ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    # -- saves ----------------------------------------------------------------------
    def start_saves(self) -> None:
        """Staging and block ids of every save, on the cache's device, before the forward
        pass: building an index tensor from a list inside it would make the host wait
        for the GPU at every layer."""
        device = self.kv_caches[0].device
        for spec in self.meta.saves:
            shape = self.chunk_shape(spec.end - spec.start)
            self.save_staging[spec.key] = torch.empty(shape, dtype=self.ctx.dtype, device=device)
            ids = torch.tensor(spec.block_ids)
            if device.type == "cuda":
                ids = ids.pin_memory().to(device, non_blocking=True)
            self.save_ids[spec.key] = ids

    def save_layer(self, layer: int, kv_layer: torch.Tensor, skip: set[str]) -> None:
        bs = self.ctx.block_size
        for spec in self.meta.saves:
            if spec.request_id in skip:
                continue
            staging = self.save_staging[spec.key]  # a device memcpy on a GPU: no host sync
            blocks = kv_layer.index_select(0, self.save_ids[spec.key])  # [nb, 2, BS, KVH, D]
            dst = staging[layer].view(2, len(spec.block_ids), bs, *staging.shape[3:])
            dst.copy_(blocks.transpose(0, 1))

    def finish_saves(self, skip: set[str]) -> tuple[Callable[[], list[Chunk]], list[SaveSpec]]:
        """A function building the staged chunks to put, and their specs (saves of requests
        in ``skip`` are dropped). The function runs on the store's executor: the host copy
        and the checksums stay off the engine thread. On CUDA its copy is queued on the
        cache's stream from that thread, so it follows this step's kernels; the staging
        tensors it holds are allocated per step, so nothing overwrites them meanwhile."""
        specs = [spec for spec in self.meta.saves if spec.request_id not in skip]
        staged = [(spec.key, self.save_staging[spec.key], spec.end - spec.start) for spec in specs]
        make_chunk = self.store.make_chunk

        def build() -> list[Chunk]:
            return [make_chunk(key, kv.to(HOST), n) for key, kv, n in staged]

        return build, specs
