"""Large host tensors on transparent huge pages.

Why: decode attention on the CPU streams every running sequence's KV blocks from memory
at every step, and the blocks of a sequence lie anywhere in the cache. With 4 KiB pages
every other 4 KiB of KV read is a TLB miss; backed by 2 MiB pages, the same reads ran
~10% faster on this project's benchmark VM (docs/engine.md). Where transparent huge
pages are ``madvise``-only (a common default), memory has to ask for them.

The tensor is a view of an anonymous private mapping with ``MADV_HUGEPAGE``, every page
touched at allocation (as ``torch.zeros`` does); the tensor keeps the mapping alive.
Where ``madvise`` or huge pages are unavailable, the mapping still works with small
pages, and a failed mapping falls back to ``torch.zeros``.
"""

from __future__ import annotations

import logging
import math
import mmap

import torch

log = logging.getLogger(__name__)
MIN_BYTES = 4 << 20  # smaller tensors gain nothing from 2 MiB pages


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor of ``shape`` backed by huge pages where the OS allows."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError) as exc:
        log.debug("no anonymous mapping of %d bytes (%s); torch.zeros instead", nbytes, exc)
        return torch.zeros(shape, dtype=dtype)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            region.madvise(advice)
        except OSError as exc:  # THP disabled ("never") or not built in: small pages
            log.debug("MADV_HUGEPAGE refused (%s)", exc)
    tensor = torch.frombuffer(region, dtype=dtype).view(shape)
    # Touch every page now, as torch.zeros would: a page first written later costs a
    # fault that zeroes a whole 2 MiB page in the middle of a request (measured: 1.6 s
    # for the first scatter of a 4k-token load into an untouched 1 GiB cache).
    tensor.zero_()
    return tensor
