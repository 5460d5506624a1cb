"""Find a model by name: a built-in preset or a local HF checkpoint directory."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError
from engine.model_config import ModelConfig
from engine.models.llama import hf_weight_names
from engine.presets import PRESETS, preset_names, preset_tokenizer, preset_weights
from engine.tokenizer import Tokenizer

Weights = Iterator[tuple[str, torch.Tensor]]


@dataclass(slots=True)
class ModelSource:
    """What the engine needs to build a model: shape, weights (lazily), tokenizer."""

    name: str  # preset name or resolved checkpoint path
    config: ModelConfig
    weight_names: frozenset[str]
    open_weights: Callable[[], Weights]
    tokenizer: Tokenizer | None


def open_model(model: str) -> ModelSource:
    """Resolve ``model`` to a :class:`ModelSource` or raise a one-line ModelLoadError."""
    if model in PRESETS:
        cfg = PRESETS[model]
        names = frozenset(hf_weight_names(cfg))
        return ModelSource(model, cfg, names, lambda: preset_weights(cfg), preset_tokenizer(cfg))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"unknown model {model!r}: not a built-in preset ({', '.join(preset_names())}) "
            "and not a checkpoint directory"
        )
    return _open_checkpoint(path.resolve())


def _open_checkpoint(path: Path) -> ModelSource:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"checkpoint {path} has no config.json")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    config = ModelConfig.from_hf(hf_cfg, _generation_eos(path))
    files = _safetensors_files(path)
    names: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                names.update(st.keys())
        except Exception as e:  # safetensors raises its own error types on broken files
            raise ModelLoadError(f"cannot read {f}: {e}") from None

    def open_weights() -> Weights:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)

    tok_file = path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.is_file() else None
    return ModelSource(str(path), config, frozenset(names), open_weights, tokenizer)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelLoadError(f"checkpoint {path} is missing shard {missing[0]}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"checkpoint {path} has no *.safetensors weights")
    return files


def _generation_eos(path: Path) -> tuple[int, ...]:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return ()
    try:
        eos = json.loads(gen.read_text()).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{gen} is not valid JSON: {e}") from None
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)
