"""The chunks of a stream put, in columns: one header per run of alike chunks.

A put's frame names its chunks in groups, each ``[header, nbytes, keys, xxh3s, hashes]``
(a region put adds ``offsets``, where each payload lies in the client's region):

* ``header``: the encoded prefix and header (kvcore/chunk.py) of the group's first chunk;
* ``nbytes``: the payload size of every chunk of the group, as sent;
* ``keys``, ``xxh3s``: each chunk's key and payload checksum, the first chunk's included;
* ``hashes``: each chunk's block hash, for the daemon to check that its key names it, or
  empty.

Every chunk of a group has the first one's header but for key and checksum: the same
fingerprint, dtype, shape, token count, layout and size. A model's chunks are alike but
for the last of a request, so a put of any size carries a header or two, not one per
chunk.

Why: one msgpack header per chunk cost the client ~2 µs to encode and the daemon ~4 µs to
parse and check, about a sixth of the daemon's work per 64 KiB chunk, the size at which
a put is bound by that work (docs/daemon.md). A column of keys is checked by one regex
pass, a column of checksums by one range check, and the header once per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcore.chunk import Chunk, encode_prefix

HEADER, NBYTES, KEYS, XXH3S, HASHES, OFFSETS = range(6)
FIELDS = 5
"""Fields of a group; a region put's groups have one more (OFFSETS)."""


def put_groups(
    chunks: Sequence[Chunk], sizes: Sequence[int], offsets: Sequence[int] | None = None
) -> list[list[Any]]:
    """The groups naming ``chunks`` (payloads of ``sizes`` bytes, at ``offsets`` in the
    client's region for a region put), in order: consecutive alike chunks share one."""
    groups: list[list[Any]] = []
    last: Any = None
    for i, (c, n) in enumerate(zip(chunks, sizes, strict=True)):
        h = c.header
        alike = (h.fingerprint, h.dtype, h.shape, h.num_tokens, h.nbytes, h.layout, h.version, n)
        if alike != last:
            last = alike
            groups.append([encode_prefix(h), n, [], [], []] + ([] if offsets is None else [[]]))
        group = groups[-1]
        group[KEYS].append(h.key)
        group[XXH3S].append(h.checksum)
        if offsets is not None:
            group[OFFSETS].append(offsets[i])
    return groups
