"""Freeze a long-running process's start-up heap out of the cyclic garbage collector.

Why: a process that has imported torch and grpc holds ~200,000 objects the collector
tracks, and every full collection walks all of them, although none of them will ever be
garbage. On the daemon's put path (reserve pages, commit) that was more than half the
per-chunk cost: 4.5 µs per chunk with the collector as it is, 2.0 µs after
``gc.freeze()``, 1.9 µs with it off. vLLM freezes its engine's heap after start-up for
the same reason. Only for processes that have finished starting and stay up: frozen
objects are never collected by the cycle collector (reference counting still frees them).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then exempt every object alive now from future collections."""
    gc.collect()
    gc.freeze()
