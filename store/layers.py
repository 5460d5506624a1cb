"""Per-layer delivery of a get: the chunks handed over layer by layer as each is ready.

Why per layer: a caller waits for layer i only, not for the whole load (the engine runs
layer 0's attention while later layers are still being copied in). Today every layer is
ready at once after the whole-chunk read and checksum, since a chunk's checksum covers
its whole payload and the tiers read whole objects; a chunk format with per-layer
checksums and ranged tier reads could deliver layer 0 first, here, without any change
to callers (``TieredStore.get_layers_async``, connector/transfer.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kvcore.chunk import Chunk

LayerSink = Callable[[int, list[Chunk | None]], bool]
"""``sink(layer, chunks)``: layer ``layer`` of every verified chunk in ``chunks`` may be
read now. Returning False stops the delivery of later layers."""


def get_layers(
    get: Callable[[list[str], Sequence[Any] | None], list[Chunk | None]],
    keys: list[str],
    outs: Sequence[Any] | None,
    sink: LayerSink,
) -> list[Chunk | None]:
    """``get(keys, outs)``, then ``sink(i, chunks)`` for each layer i of the chunks found
    until one returns False; the chunks (``get``'s result)."""
    chunks = get(keys, outs)
    layers = next((c.header.shape[0] for c in chunks if c is not None and c.header.shape), 0)
    for layer in range(layers):
        if sink(layer, chunks) is False:
            break
    return chunks
