"""The chunk object: encoding, decoding and every way verification must refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcore.chunk import (
    HEADER_READ_SIZE,
    ChunkError,
    decode,
    decode_header,
    encode,
    encode_prefix,
    make_chunk,
    to_tensor,
    verify,
)
from kvcore.keys import ModelFingerprint, block_hashes, chunk_refs

FP = ModelFingerprint("tiny", "sha:0", "bfloat16", num_layers=2, num_kv_heads=2, head_dim=4)


def _chunk(seed: int = 0):
    kv = torch.randn(2, 2, 16, 2, 4, generator=torch.Generator().manual_seed(seed)).to(
        torch.bfloat16
    )
    key = chunk_refs(block_hashes(list(range(16)), 16), 16, 16, FP)[0].key
    return make_chunk(key, FP.digest(), kv, 16), kv


def test_round_trip_keeps_header_and_payload():
    c, kv = _chunk()
    d = decode(encode(c))
    assert d.header == c.header
    assert (
        d.header.shape == (2, 2, 16, 2, 4)
        and d.header.dtype == "bfloat16"
        and d.header.num_tokens == 16
    )
    verify(d, c.key, FP.digest())
    assert torch.equal(to_tensor(d), kv)


def test_layer_is_a_contiguous_slice_of_the_payload():
    c, kv = _chunk()
    per_layer = c.header.nbytes // 2
    layer1 = np.asarray(c.payload)[per_layer:]
    assert bytes(layer1) == kv[1].contiguous().view(torch.uint8).numpy().tobytes()


def test_flipped_payload_bit_fails_checksum():
    c, _ = _chunk()
    raw = bytearray(encode(c))
    raw[-5] ^= 0x10
    with pytest.raises(ChunkError, match="checksum"):
        verify(decode(bytes(raw)), c.key, FP.digest())


def test_wrong_key_and_wrong_fingerprint_are_refused():
    c, _ = _chunk()
    with pytest.raises(ChunkError, match="holds"):
        verify(c, "0" * 64, FP.digest())
    with pytest.raises(ChunkError, match="fingerprint"):
        verify(c, c.key, b"\x00" * 32)


def test_truncated_and_foreign_objects_are_refused():
    c, _ = _chunk()
    raw = encode(c)
    with pytest.raises(ChunkError, match="payload is"):
        decode(raw[:-1])
    with pytest.raises(ChunkError):
        decode(raw[:8])
    with pytest.raises(ChunkError, match="magic"):
        decode(b"NOPE" + raw[4:])
    with pytest.raises(ChunkError):
        decode_header(raw[:20])


def test_unknown_format_version_is_refused():
    c, _ = _chunk()
    bad = c.header.__class__(
        **{**{f: getattr(c.header, f) for f in c.header.__slots__}, "version": 99}
    )
    with pytest.raises(ChunkError, match="version 99"):
        decode(encode_prefix(bad) + bytes(c.payload))


def test_aligned_prefix_puts_the_payload_on_a_page():
    c, _ = _chunk()
    prefix = encode_prefix(c.header, align=HEADER_READ_SIZE)
    assert len(prefix) == HEADER_READ_SIZE
    assert decode(prefix + bytes(c.payload)).header == c.header
