"""Llama-family decoder (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k norm).

Follows HF transformers' arithmetic step for step (RMSNorm in float32, rotate_half RoPE,
residual order) so greedy outputs match token for token. q/k/v and gate/up projections
are fused into one matmul each; the checkpoint's separate tensors are copied into slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.errors import ModelLoadError
from engine.model_config import ModelConfig
from engine.models.rope import apply_rope, cos_sin_table

LayerHook = Callable[[int, torch.Tensor], None]
"""Called as ``hook(layer_index, kv_cache)`` before (load) or after (save) a layer's attention."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class Linear(nn.Module):
    """``nn.Linear`` without the random initialisation: weights always come from a checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = h * d, kvh * d
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, o_bias)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.input_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(d))
            self.k_norm = nn.Parameter(torch.ones(d))
        self.scale = d**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cfg = self.cfg
        residual = x
        x = rms_norm(x, self.input_layernorm, cfg.rms_norm_eps)
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)  # [T, H, D]
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)  # [T, KVH, D]
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = paged_attention(q, k, v, kv_cache, meta, self.scale)
        x = residual + self.o_proj(attn.reshape(-1, self.q_size))
        residual = x
        x = rms_norm(x, self.post_attention_layernorm, cfg.rms_norm_eps)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return residual + self.down_proj(F.silu(gate) * up)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head; ``forward`` runs one flattened step over paged KV caches."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool = False, o_bias: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, qkv_bias, o_bias) for _ in range(cfg.num_layers)
        )
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.rope_cos = self.rope_sin = torch.empty(0)

    def init_buffers(self, device: torch.device) -> None:
        """Build the RoPE tables (not weights: they are computed, never loaded)."""
        cos, sin = cos_sin_table(self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        before_layer: LayerHook | None = None,
        after_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i, kv_caches[i])
            x = layer(x, cos, sin, kv_caches[i], meta)
            if after_layer is not None:
                after_layer(i, kv_caches[i])
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for the selected hidden states [N, hidden]."""
        return F.linear(hidden, self.lm_head_weight).float()

    # -- weights -------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; fail naming any missing one."""
        layer0: DecoderLayer = self.layers[0]  # type: ignore[assignment]
        expected = set(
            hf_weight_names(
                self.cfg, layer0.qkv_proj.bias is not None, layer0.o_proj.bias is not None
            )
        )
        seen: set[str] = set()
        with torch.no_grad():
            for name, tensor in weights:
                target = self._target(name)
                if target is None:
                    continue  # e.g. rotary inv_freq buffers in old checkpoints
                if target.shape != tensor.shape:
                    raise ModelLoadError(
                        f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(tensor)
                seen.add(name)
        missing = sorted(expected - seen)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelLoadError(f"checkpoint is missing weight {missing[0]}{more}")

    def _target(self, name: str) -> torch.Tensor | None:
        """The parameter slice an HF tensor name lands in, or None to ignore it."""
        if name == "model.embed_tokens.weight":
            return self.embed_tokens
        if name == "model.norm.weight":
            return self.norm
        if name == "lm_head.weight":
            return None if self.cfg.tie_word_embeddings else self.lm_head
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        idx = int(parts[2])
        if idx >= len(self.layers):
            raise ModelLoadError(f"checkpoint has weight {name} beyond num_hidden_layers")
        layer: DecoderLayer = self.layers[idx]  # type: ignore[assignment]
        sub = ".".join(parts[3:])
        qs, kvs, inter = layer.q_size, layer.kv_size, self.cfg.intermediate_size
        qkv_slices = {"q": (0, qs), "k": (qs, qs + kvs), "v": (qs + kvs, qs + 2 * kvs)}
        for n, (a, b) in qkv_slices.items():
            if sub == f"self_attn.{n}_proj.weight":
                return layer.qkv_proj.weight[a:b]
            if sub == f"self_attn.{n}_proj.bias" and layer.qkv_proj.bias is not None:
                return layer.qkv_proj.bias[a:b]
        simple = {
            "self_attn.o_proj.weight": layer.o_proj.weight,
            "self_attn.o_proj.bias": layer.o_proj.bias,
            "mlp.gate_proj.weight": layer.gate_up_proj.weight[:inter],
            "mlp.up_proj.weight": layer.gate_up_proj.weight[inter:],
            "mlp.down_proj.weight": layer.down_proj.weight,
            "input_layernorm.weight": layer.input_layernorm,
            "post_attention_layernorm.weight": layer.post_attention_layernorm,
            "self_attn.q_norm.weight": getattr(layer, "q_norm", None),
            "self_attn.k_norm.weight": getattr(layer, "k_norm", None),
        }
        return simple.get(sub)


def hf_weight_names(cfg: ModelConfig, qkv_bias: bool = False, o_bias: bool = False) -> list[str]:
    """Every tensor name an HF checkpoint of this shape must hold."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if qkv_bias:
            names += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        if o_bias:
            names.append(p + "self_attn.o_proj.bias")
        if cfg.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names
