"""Builds the model and its paged KV cache, turns a scheduled step into tensors, runs it."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from engine import paged_kernel
from engine.batch import build_batch
from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.host_memory import zeros_on_huge_pages
from engine.kv_manager import cdiv
from engine.loader import ModelSource
from engine.models.llama import LayerHook, LlamaForCausalLM
from engine.scheduler import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from connector.base import KVConnectorBase

CPU_KV_CAP = 2 * 2**30


class ModelRunner:
    """Owns the weights and the per-layer KV caches ``[num_blocks, 2, block_size, KVH, D]``."""

    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        self.model_config = mc = source.config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(mc.torch_dtype, self.device)
        self.block_size = config.block_size
        self.model = self._build_model(source)
        self.bytes_per_block = (
            mc.num_layers
            * 2
            * self.block_size
            * mc.num_kv_heads
            * mc.head_dim
            * self.dtype.itemsize
        )
        self.num_blocks = self._num_blocks()
        kv_shape = (self.num_blocks, 2, self.block_size, mc.num_kv_heads, mc.head_dim)
        # zeros, not empty: masked-out slots are multiplied by 0 and must not hold NaN
        self.kv_caches = [self._zeros(kv_shape) for _ in range(mc.num_layers)]
        limit = config.max_model_len or mc.max_position_embeddings
        self.max_model_len = min(
            limit, mc.max_position_embeddings, self.num_blocks * self.block_size
        )
        self.kernel = self._attention_kernel()
        self.before_layer: LayerHook | None = None
        self.after_layer: LayerHook | None = None
        self.connector: KVConnectorBase | None = None

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type == "cpu":  # streamed by decode attention: huge pages help
            return zeros_on_huge_pages(shape, self.dtype)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def attach_connector(self, connector: KVConnectorBase) -> None:
        """Route every step's KV through ``connector``: its loads land before each layer's
        attention, its saves read each layer's KV right after."""
        connector.register_kv_caches(self.kv_caches)
        self.connector = connector
        self.before_layer = lambda i, kv: connector.wait_for_layer_load(i)
        self.after_layer = lambda i, kv: connector.save_kv_layer(i, kv)

    def _attention_kernel(self) -> ModuleType | None:
        """The paged decode kernel where ``attention_backend`` asks for it (see EngineConfig)."""
        wanted = self.config.attention_backend
        if wanted == "sdpa" or (wanted == "auto" and self.device.type != "cpu"):
            return None
        if self.device.type != "cpu":
            raise ModelLoadError(
                "attention_backend 'paged' is a CPU kernel; use 'sdpa' or 'auto' on CUDA"
            )
        kernel = paged_kernel.load()
        if kernel is None and wanted == "paged":
            raise ModelLoadError(
                "attention_backend 'paged': the kernel could not be built (see the log)"
            )
        return kernel

    def _build_model(self, source: ModelSource) -> LlamaForCausalLM:
        names = source.weight_names
        qkv_bias = "model.layers.0.self_attn.q_proj.bias" in names
        o_bias = "model.layers.0.self_attn.o_proj.bias" in names
        with torch.device(self.device):
            model = LlamaForCausalLM(self.model_config, qkv_bias=qkv_bias, o_bias=o_bias)
        model = model.to(self.dtype)
        model.load_weights(source.open_weights())
        model.init_buffers(self.device)
        model.requires_grad_(False)
        return model.eval()

    def _num_blocks(self) -> int:
        mem = self.config.kv_cache_memory
        if mem is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                mem = int(free * self.config.gpu_memory_utilization)
            else:
                limit = self.config.max_model_len or self.model_config.max_position_embeddings
                wanted = (
                    self.config.max_num_seqs * cdiv(limit, self.block_size) * self.bytes_per_block
                )
                mem = min(wanted, CPU_KV_CAP)
        n = int(mem) // self.bytes_per_block
        if n < 1:
            raise ModelLoadError(
                f"kv_cache_memory {mem} bytes is less than one KV block ({self.bytes_per_block} bytes)"
            )
        return n

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledRequest]]:
        """Run one step; logits [N, vocab] and the N scheduled requests they belong to."""
        batch = build_batch(
            out, self.block_size, self.model_config.sliding_window, self.device, self.kernel
        )
        if self.connector is not None and out.connector_meta is not None:
            self.connector.start_load_kv(out.connector_meta)
        try:
            hidden = self.model(
                batch.input_ids,
                batch.positions,
                self.kv_caches,
                batch.attn,
                self.before_layer,
                self.after_layer,
            )
        except BaseException:
            if self.connector is not None:  # the step's KV is incomplete: save none of it
                self.connector.wait_for_save(discard=True)
            raise
        if self.connector is not None:
            self.connector.wait_for_save()
        return self.model.compute_logits(hidden[batch.logits_indices]), batch.sampled
