"""Built-in models that need no download: random weights from a fixed seed.

``tiny`` (a few MB) is for tests and the README; ``bench`` (~100M parameters, Llama-shaped
with grouped-query attention) gives benchmark figures a realistic shape. ``save_preset``
writes either as an HF checkpoint directory so HF transformers and vLLM load the very
same weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.model_config import ModelConfig, RopeConfig
from engine.tokenizer import Tokenizer, byte_level_tokenizer

EOS_ID = 1
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0),
        tie_word_embeddings=False,
        eos_token_ids=(EOS_ID,),
    ),
    "bench": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=16384,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0),
        tie_word_embeddings=True,
        eos_token_ids=(EOS_ID,),
    ),
}
PRESET_SEED = 1234
INIT_STD = 0.02  # HF's initializer_range


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_weights(cfg: ModelConfig, seed: int = PRESET_SEED) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named float32 tensors, normal(0, 0.02) for matrices and ones for norms."""
    gen = torch.Generator().manual_seed(seed)
    d, hd = cfg.hidden_size, cfg.head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, INIT_STD, generator=gen)

    yield "model.embed_tokens.weight", normal(cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", normal(cfg.num_heads * hd, d)
        yield p + "self_attn.k_proj.weight", normal(cfg.num_kv_heads * hd, d)
        yield p + "self_attn.v_proj.weight", normal(cfg.num_kv_heads * hd, d)
        yield p + "self_attn.o_proj.weight", normal(d, cfg.num_heads * hd)
        yield p + "mlp.gate_proj.weight", normal(cfg.intermediate_size, d)
        yield p + "mlp.up_proj.weight", normal(cfg.intermediate_size, d)
        yield p + "mlp.down_proj.weight", normal(d, cfg.intermediate_size)
        yield p + "input_layernorm.weight", torch.ones(d)
        yield p + "post_attention_layernorm.weight", torch.ones(d)
    yield "model.norm.weight", torch.ones(d)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", normal(cfg.vocab_size, d)


def preset_tokenizer(cfg: ModelConfig) -> Tokenizer:
    return byte_level_tokenizer(cfg.vocab_size)


def save_preset(name: str, path: str | Path) -> Path:
    """Write preset ``name`` as an HF checkpoint directory and return its path."""
    cfg = PRESETS[name]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    gen_cfg = {"eos_token_id": list(cfg.eos_token_ids), "pad_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    save_file(dict(preset_weights(cfg)), str(out / "model.safetensors"), metadata={"format": "pt"})
    preset_tokenizer(cfg).save(out / "tokenizer.json")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": cfg.max_position_embeddings,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out
