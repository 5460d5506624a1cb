"""Host staging buffers for chunk loads, reused from step to step.

Why: on the CPU a fresh chunk-sized tensor per load (6 MiB for the ``bench`` preset's
256-token chunks) is a fresh mapping from the allocator, and the tier's copy into it
page-faults every 4 KiB: a 4k-token load read 96 MiB in 20 ms into reused buffers and in
30-60 ms into fresh ones. Loads on CUDA stage through pinned memory, which torch's
caching host allocator already reuses (and which it frees only once the side stream's
copies are done); they do not use this pool.

A buffer goes back only when its load's store job has ended (the done callback of its
future): a load the engine gave up on keeps writing into its staging until then.
"""

from __future__ import annotations

import math
import threading

import torch

DEFAULT_KEEP_BYTES = 512 << 20  # free buffers kept for the next steps; the rest are freed


class StagingPool:
    """Free host tensors of one shape and dtype; ``take`` reuses one or allocates."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, keep_bytes: int = DEFAULT_KEEP_BYTES
    ) -> None:
        self.shape = shape
        self.dtype = dtype
        nbytes = math.prod(shape) * dtype.itemsize
        self.keep = max(1, keep_bytes // max(1, nbytes))
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers ever allocated (tests, metrics)

    def take(self, n: int) -> list[torch.Tensor]:
        with self._lock:
            reused, self._free = self._free[:n], self._free[n:]
        fresh = [torch.empty(self.shape, dtype=self.dtype) for _ in range(n - len(reused))]
        self.allocated += len(fresh)
        return reused + fresh

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            room = self.keep - len(self._free)
            self._free.extend(buffers[: max(0, room)])

    def __len__(self) -> int:
        return len(self._free)
