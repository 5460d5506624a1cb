"""Paged attention over per-layer KV caches of shape ``[num_blocks, 2, block_size, kv_heads, head_dim]``.

One step's tokens are flattened into a batch ``[T]`` laid out as::

    | decode tokens (one per request) | prefill span 0 | prefill span 1 | ...
      0 .. num_decode-1                 start..end       start..end

Decodes are attended either by the paged kernel (``engine/paged_kernel.py``: one call
for all of them, reading KV blocks in place; the CPU default) or, sorted by length, in a
few padded, masked SDPA calls over their gathered blocks (one call per group of similar
lengths, so padding stays small; the CUDA path and the fallback); each
prefill span (a request computing several tokens, maybe after a cached prefix) gets its
own call with a causal mask offset by the tokens already in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSpan:
    start: int  # slice of the flattened batch
    end: int
    context_len: int  # tokens of this request already in the cache before this step
    block_table: torch.Tensor  # [num_blocks_needed] long
    mask: torch.Tensor | None  # [1, 1, n, context_len + n] bool, None = plain causal


@dataclass(slots=True)
class DecodeGroup:
    """One query token per request. Either ``mask`` is set (gather + SDPA) or
    ``positions`` and ``kernel`` are (the paged kernel reads keys ``pos - window + 1 .. pos``)."""

    start: int  # slice of the flattened batch: one query token per request
    end: int
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with block 0
    mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] bool
    positions: torch.Tensor | None = None  # [B] long: each query's position
    window: int = 0  # sliding window for the kernel, 0 for none
    kernel: ModuleType | None = None


@dataclass(slots=True)
class AttentionMetadata:
    """Where each new token's KV goes and what each query attends to, for one step."""

    slot_blocks: torch.Tensor  # [T] block id of each new token
    slot_offsets: torch.Tensor  # [T] offset inside that block
    decodes: list[DecodeGroup]
    prefills: list[PrefillSpan]


def allowed_keys(
    query_pos: torch.Tensor, num_keys: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Bool mask ``[len(query_pos), num_keys]``: key j visible to a query at position p."""
    keys = torch.arange(num_keys, device=device)
    mask = keys[None, :] <= query_pos[:, None]
    if window is not None:
        mask &= keys[None, :] > query_pos[:, None] - window
    return mask


def gather_kv(
    kv_cache: torch.Tensor, block_tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the blocks in ``block_tables`` [B, MB], each ``[B, KVH, MB*BS, D]``.

    ``index_select`` on the ``kv_cache[:, 0]`` / ``[:, 1]`` views copies whole blocks (one
    contiguous run each), so each gather is a single copy; the results are returned as
    transposed views, which SDPA reads through their strides without another copy.
    (Advanced indexing ``view[tables]`` is several times slower on the CPU.)
    """
    b, mb = block_tables.shape
    _, _, bs, kvh, d = kv_cache.shape
    flat = block_tables.reshape(-1)
    keys = torch.index_select(kv_cache[:, 0], 0, flat).view(b, mb * bs, kvh, d).transpose(1, 2)
    vals = torch.index_select(kv_cache[:, 1], 0, flat).view(b, mb * bs, kvh, d).transpose(1, 2)
    return keys, vals


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    kv_cache: torch.Tensor,  # [NB, 2, BS, KVH, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    kv_cache[meta.slot_blocks, 0, meta.slot_offsets] = k
    kv_cache[meta.slot_blocks, 1, meta.slot_offsets] = v
    out = torch.empty_like(q)
    kvh = kv_cache.shape[3]
    for g in meta.decodes:
        if g.kernel is not None:
            g.kernel.paged_decode(
                q[g.start : g.end].contiguous(),
                out[g.start : g.end],
                kv_cache,
                g.block_tables,
                g.positions,
                g.window,
                scale,
            )
            continue
        keys, vals = gather_kv(kv_cache, g.block_tables)  # [B, KVH, L, D]
        b, h, d = g.end - g.start, q.shape[1], q.shape[2]
        # One query per request: the h // kvh query heads sharing a KV head become that
        # head's "query rows" (HF's repeat_kv grouping), so no K/V is expanded for GQA.
        qg = q[g.start : g.end].view(b, kvh, h // kvh, d)
        o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=g.mask, scale=scale)
        out[g.start : g.end] = o.reshape(b, h, d)  # CUDA SDPA may return it non-contiguous
    for span in meta.prefills:
        qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if span.mask is None:  # nothing cached before: attend to the fresh k/v causally
            keys = k[span.start : span.end].transpose(0, 1).unsqueeze(0)
            vals = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, keys, vals, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            n_keys = span.mask.shape[-1]
            keys, vals = gather_kv(kv_cache, span.block_table[None])  # [1, KVH, L, D]
            keys, vals = keys[:, :, :n_keys], vals[:, :, :n_keys]
            o = F.scaled_dot_product_attention(
                qs, keys, vals, attn_mask=span.mask, scale=scale, enable_gqa=True
            )
        out[span.start : span.end] = o.squeeze(0).transpose(0, 1)
    return out
