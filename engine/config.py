"""Engine configuration, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import InvalidRequestError
from store import config as store_config


def parse_size(value: int | str, name: str = "size") -> int:
    """Bytes from an int or a string such as ``512MiB`` (the store's parser, engine errors)."""
    try:
        return store_config.parse_size(value, name)
    except store_config.ConfigError as e:
        raise InvalidRequestError(str(e)) from None


ATTENTION_BACKENDS = ("auto", "paged", "sdpa")
KV_ROLES = ("both", "producer", "consumer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs a model.

    ``kv_cache_memory`` sizes the paged KV cache (bytes or ``"2GiB"``). Unset, it is
    ``gpu_memory_utilization`` of the free GPU memory on CUDA, and on the CPU what
    ``max_num_seqs`` full-length sequences need, capped at 2 GiB.

    ``kv_connector`` names the connector that saves and loads KV outside the engine
    (``none`` or ``tiered``); ``kv_config`` configures it (for ``tiered``: a store YAML
    path, a mapping of store keys, or a ``store.config.StoreConfig``). A load that fails
    or takes longer than ``kv_load_timeout`` seconds is recomputed
    (``kv_load_failure_policy="recompute"``) or fails its request (``"fail"``).

    ``attention_backend`` picks decode attention: ``paged`` is the CPU kernel that reads
    KV blocks in place (``engine/csrc``, compiled on first use), ``sdpa`` gathers the
    blocks and calls PyTorch's SDPA (the CUDA path), ``auto`` takes ``paged`` on the CPU
    when it builds and ``sdpa`` otherwise.

    ``kv_role`` is the engine's part in disaggregated prefill/decode: ``producer`` saves
    KV to the store but never loads from it, ``consumer`` loads but never saves,
    ``both`` (the default) does both.
    """

    model: str = "tiny"
    dtype: str = "auto"  # auto: the checkpoint's dtype on CUDA, float32 on the CPU
    device: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    seed: int = 0
    kv_connector: str = "none"
    kv_config: Any = None
    kv_load_failure_policy: str = "recompute"
    kv_load_timeout: float = 5.0
    kv_save_decoded: bool = False  # also save generated tokens' KV (a later turn reuses it)
    enable_kv_events: bool = False  # keep typed KV events for take_kv_events()
    attention_backend: str = "auto"  # auto | paged (the CPU kernel) | sdpa
    kv_role: str = "both"  # producer: only save KV to the store, consumer: only load it

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidRequestError(
                f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidRequestError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError("gpu_memory_utilization must be in (0, 1]")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise InvalidRequestError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size(self.kv_cache_memory, "kv_cache_memory")
        self._check_kv_connector()

    def _check_kv_connector(self) -> None:
        from connector.base import LOAD_FAILURE_POLICIES, connector_names

        if self.kv_connector not in connector_names():
            raise InvalidRequestError(
                f"kv_connector must be one of {', '.join(connector_names())}, got {self.kv_connector!r}"
            )
        if self.kv_load_failure_policy not in LOAD_FAILURE_POLICIES:
            raise InvalidRequestError(
                f"kv_load_failure_policy must be one of {', '.join(LOAD_FAILURE_POLICIES)}, "
                f"got {self.kv_load_failure_policy!r}"
            )
        if not self.kv_load_timeout > 0:
            raise InvalidRequestError(
                f"kv_load_timeout must be > 0 seconds, got {self.kv_load_timeout}"
            )
        if self.kv_role not in KV_ROLES:
            raise InvalidRequestError(
                f"kv_role must be one of {', '.join(KV_ROLES)}, got {self.kv_role!r}"
            )
        if self.kv_role != "both" and self.kv_connector == "none":
            raise InvalidRequestError(
                f"kv_role {self.kv_role!r} needs a KV connector (kv_connector 'tiered')"
            )
        if self.kv_config is not None and self.kv_connector == "none":
            raise InvalidRequestError("kv_config is set but kv_connector is 'none'")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(checkpoint_dtype, torch.bfloat16)
