"""GPU tier: the cpu tier's paged pool and policy, with the pool in device memory.

For hot chunks that several engine processes on one GPU reuse, or as a staging area
ahead of GDS. Payloads come back as CUDA uint8 tensors (or are copied into the caller's
tensor, host or device).
"""

from __future__ import annotations

from typing import Any

import torch

from backends.base import BackendUnavailable
from backends.cpu import CPUBackend


class GPUBackend(CPUBackend):
    """Device-memory tier of ``capacity`` bytes on ``cuda:<device_index>``."""

    name = "gpu"

    def __init__(
        self,
        capacity: int,
        page_size: int = 64 * 1024,
        policy: str = "s3fifo",
        device_index: int = 0,
    ) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                "backend 'gpu' needs a CUDA device and a CUDA build of torch; none here "
                f"(torch {torch.__version__}). Drop 'gpu' from tiers on this machine."
            )
        self.device = f"cuda:{device_index}"
        super().__init__(capacity, page_size=page_size, policy=policy, pin_memory=False)

    def _new_buffer(self, nbytes: int) -> Any:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
