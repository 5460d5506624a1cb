"""Tiny random HF checkpoints of each supported architecture, saved with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.tokenizer import byte_level_tokenizer

VOCAB = 384
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=1,
    bos_token_id=0,
    pad_token_id=2,
)


def hf_config(arch: str):
    import transformers as tf

    if arch == "llama":  # head_dim != hidden / heads, Llama-3 rope scaling, untied
        return tf.LlamaConfig(
            **COMMON,
            head_dim=32,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=50000.0,
        )
    if arch == "qwen2":  # q/k/v bias, tied embeddings
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=10000.0)
    if arch == "qwen3":  # q/k norm, head_dim != hidden / heads
        return tf.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)
    if arch == "mistral":  # a sliding window shorter than the longest prompt
        return tf.MistralConfig(**COMMON, sliding_window=48, tie_word_embeddings=False)
    raise ValueError(arch)


def make_checkpoint(arch: str, path: Path, seed: int = 0):
    """Save a random model of ``arch`` to ``path``; returns the HF model (eval, float32)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # larger weights than HF's init make the argmax less fragile
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    byte_level_tokenizer(VOCAB).save(path / "tokenizer.json")
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` greedy continuation of one prompt, never stopping early.

    (``min_new_tokens`` would not do: it masks EOS out of the logits, changing the argmax.)
    """
    import transformers as tf

    model.generation_config.eos_token_id = None
    gen_cfg = tf.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2, eos_token_id=None
    )
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=gen_cfg,
        )
    assert out.shape[1] == len(prompt) + max_new_tokens, "HF stopped early"
    return out[0, len(prompt) :].tolist()
