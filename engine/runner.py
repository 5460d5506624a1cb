"""Builds the model and its paged KV cache, turns a scheduled step into tensors, runs it."""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, DecodeGroup, PrefillSpan, allowed_keys
from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.kv_manager import cdiv
from engine.loader import ModelSource
from engine.models.llama import LayerHook, LlamaForCausalLM
from engine.scheduler import ScheduledRequest, SchedulerOutput

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
            mc.num_layers * 2 * self.block_size * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        )
        self.num_blocks = self._num_blocks()
        kv_shape = (self.num_blocks, 2, self.block_size, mc.num_kv_heads, mc.head_dim)
        # zeros, not empty: masked-out slots are multiplied by 0 and must not hold NaN
        self.kv_caches = [torch.zeros(kv_shape, dtype=self.dtype, device=self.device) for _ in range(mc.num_layers)]
        limit = config.max_model_len or mc.max_position_embeddings
        self.max_model_len = min(limit, mc.max_position_embeddings, self.num_blocks * self.block_size)
        self.before_layer: LayerHook | None = None
        self.after_layer: LayerHook | None = None

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
                wanted = self.config.max_num_seqs * cdiv(limit, self.block_size) * self.bytes_per_block
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
        input_ids, positions, meta, logits_idx, sampled = self._prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.before_layer, self.after_layer)
        return self.model.compute_logits(hidden[logits_idx]), sampled

    def _prepare(self, out: SchedulerOutput):
        bs, window = self.block_size, self.model_config.sliding_window
        ids: list[int] = []
        pos: list[int] = []
        blocks: list[int] = []
        offsets: list[int] = []
        logits_idx: list[int] = []
        sampled: list[ScheduledRequest] = []

        def add_tokens(s: ScheduledRequest) -> None:
            tokens = s.request.all_token_ids
            for p in range(s.start, s.start + s.num_new_tokens):
                ids.append(tokens[p])
                pos.append(p)
                blocks.append(s.block_ids[p // bs])
                offsets.append(p % bs)
            if s.samples:
                logits_idx.append(len(ids) - 1)
                sampled.append(s)

        dev = self.device
        groups = []
        for members in _decode_groups(out.decodes, bs):
            first = len(ids)
            for s in members:
                add_tokens(s)
            width = cdiv(members[-1].start + 1, bs)
            tables = torch.tensor([(s.block_ids[:width] + [0] * width)[:width] for s in members])
            q_pos = torch.tensor([s.start for s in members])
            mask = allowed_keys(q_pos, width * bs, window, torch.device("cpu"))[:, None, None, :]
            groups.append(DecodeGroup(first, len(ids), tables.to(dev), mask.to(dev)))
        spans = []
        for s in out.prefills:
            start = len(ids)
            add_tokens(s)
            n_keys = s.start + s.num_new_tokens
            mask = None
            if s.start > 0 or (window is not None and n_keys > window):
                q_pos = torch.arange(s.start, n_keys)
                mask = allowed_keys(q_pos, n_keys, window, torch.device("cpu"))[None, None].to(dev)
            table = torch.tensor(s.block_ids[: cdiv(n_keys, bs)], device=dev)
            spans.append(PrefillSpan(start, len(ids), s.start, table, mask))
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(blocks, dtype=torch.long, device=dev),
            slot_offsets=torch.tensor(offsets, dtype=torch.long, device=dev),
            decodes=groups,
            prefills=spans,
        )
        return (torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta,
                torch.tensor(logits_idx, dtype=torch.long, device=dev), sampled)


def _decode_groups(decodes: list[ScheduledRequest], block_size: int) -> list[list[ScheduledRequest]]:
    """Decodes sorted by length, cut where a group's longest would exceed twice its shortest.

    Each group is one padded attention call; grouping keeps padding under 2x while the
    number of calls stays logarithmic in the spread of lengths.
    """
    groups: list[list[ScheduledRequest]] = []
    for s in sorted(decodes, key=lambda s: s.start):
        blocks = cdiv(s.start + 1, block_size)
        if groups and blocks <= 2 * cdiv(groups[-1][0].start + 1, block_size):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups
