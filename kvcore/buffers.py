"""Flat byte views of the buffers KV lives in (host or device), without copying."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch


def host_array(buf: Any) -> np.ndarray:
    """A flat uint8 numpy view of a host buffer (memoryview, bytes, array, CPU tensor)."""
    if isinstance(buf, torch.Tensor):
        return buf.detach().reshape(-1).view(torch.uint8).numpy()
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def as_tensor(buf: Any) -> torch.Tensor:
    """A flat uint8 tensor view of any buffer, host or device, without copying."""
    if isinstance(buf, torch.Tensor):
        return buf.detach().reshape(-1).view(torch.uint8)
    with warnings.catch_warnings():  # read-only sources are only ever read from here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(host_array(buf))


def flat_bytes(buf: Any) -> Any:
    """A flat uint8 view of a caller's buffer: a tensor stays a tensor (host or device)."""
    if isinstance(buf, torch.Tensor):
        return as_tensor(buf)
    return host_array(buf)
