"""The model fingerprint every stored chunk's key binds.

The fingerprint binds every stored chunk to the exact model that computed it: KV from
other weights, another dtype or another layout must never load (DESIGN.md, "The one
key"). The weights digest is xxh3-128 over the checkpoint's safetensors files (read
once, streamed; ~GB/s), or, for a built-in preset, a digest of its shape and seed, which
determine its random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.loader import ModelSource
from engine.presets import PRESET_SEED, PRESETS
from kvcore.keys import ModelFingerprint, checkpoint_digest, sha256_cbor


def weights_digest(source: ModelSource) -> str:
    """A digest of ``source``'s weights that two processes (or machines) agree on."""
    if source.name in PRESETS:
        shape = json.dumps(PRESETS[source.name].to_hf(), sort_keys=True)
        return "preset-sha256:" + sha256_cbor((shape, PRESET_SEED)).hex()[:32]
    return checkpoint_digest(source.name)


def model_fingerprint(source: ModelSource, dtype: torch.dtype) -> ModelFingerprint:
    """The fingerprint of ``source`` run in ``dtype`` (single rank: tp 0 of 1).

    The model name is the preset name or the checkpoint directory's base name, not its
    full path, so two machines holding one checkpoint under different paths agree.
    """
    mc = source.config
    name = source.name if source.name in PRESETS else Path(source.name).name
    return ModelFingerprint(
        model=name,
        weights_digest=weights_digest(source),
        dtype=str(dtype).removeprefix("torch."),
        num_layers=mc.num_layers,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
    )
