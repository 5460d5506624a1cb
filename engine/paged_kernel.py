"""The CPU paged decode-attention kernel (``engine/csrc/paged_decode.cpp``), built on first use.

Decode attention over a paged cache otherwise gathers every running sequence's blocks
into a contiguous copy for every layer at every step; the kernel reads them in place.
It is compiled once per machine with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja are needed; the build is cached under ``~/.cache/torch_extensions``). Where it
cannot be built, or with ``KVSTORE_PAGED_KERNEL=0``, the engine uses the gather + SDPA
path, which gives the same tokens.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
NAME = "kvstore_paged_decode"
SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"


@cache
def load() -> ModuleType | None:
    """The compiled module, or None (with one warning) where it cannot be built."""
    if os.environ.get("KVSTORE_PAGED_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import get_default_build_root
        from torch.utils.cpp_extension import load as build

        if not any(Path(get_default_build_root()).glob(f"*/{NAME}/{NAME}.so")):
            log.warning(
                "building the paged decode-attention kernel (once per machine, about a minute)"
            )
        return build(
            name=NAME,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back
        log.warning(
            "paged decode kernel unavailable (%s); using gather + SDPA", str(exc).splitlines()[0]
        )
        return None
