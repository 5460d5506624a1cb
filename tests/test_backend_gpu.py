"""Device tiers on a CUDA machine: the gpu pool tier and GDS through kvikio.

Run with ``pytest -m gpu`` on a GPU box (``pip install 'kvstore[gpu]'`` for the GDS tests).
"""

from __future__ import annotations

import pytest
import torch

from backends.base import create_backend
from kvcore.chunk import make_chunk, verify
from kvcore.keys import ModelFingerprint, block_hashes, chunk_refs
from store.config import from_flat
from store.tiered import TieredStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
FP = ModelFingerprint("tiny", "sha:0", "bfloat16", num_layers=2, num_kv_heads=2, head_dim=64)


def kv_chunks(n: int, device: str = "cuda"):
    keys = [r.key for r in chunk_refs(block_hashes(list(range(16 * n)), 16), 16, 16, FP)]
    gen = torch.Generator(device=device).manual_seed(0)
    kvs = [
        torch.randn(2, 2, 16, 2, 64, device=device, generator=gen).to(torch.bfloat16) for _ in keys
    ]
    # The checksum is taken on the host copy: what every tier verifies against.
    return [make_chunk(k, FP.digest(), kv.cpu(), 16) for k, kv in zip(keys, kvs, strict=True)], kvs


def test_gpu_tier_round_trip_into_device_buffers():
    b = create_backend("gpu", capacity=1 << 20, page_size=4096)
    chunks, kvs = kv_chunks(4)
    device_chunks = [
        c._replace(payload=kv.view(torch.uint8).reshape(-1))
        for c, kv in zip(chunks, kvs, strict=True)
    ]
    assert b.put(device_chunks) == [True] * 4
    outs = [torch.empty_like(kv) for kv in kvs]
    got = b.get([c.key for c in chunks], outs)
    for g, out, kv, c in zip(got, outs, kvs, chunks, strict=True):
        assert g.payload.device.type == "cuda"
        assert torch.equal(out, kv)
        verify(g, c.key, FP.digest())
    b.check_integrity()
    b.close()


def test_gpu_tier_evicts_and_keeps_pinned_chunks():
    chunks, _ = kv_chunks(6)
    size = chunks[0].header.nbytes
    b = create_backend("gpu", capacity=3 * size, page_size=size, policy="lru")
    b.put(chunks[:1])
    b.pin([chunks[0].key])
    b.put(chunks[1:])
    assert b.contains([chunks[0].key]) == 1 and b.usage().items == 3
    b.check_integrity()


def test_store_promotes_from_cpu_to_gpu():
    config = from_flat(
        {
            "tiers": "gpu,cpu",
            "gpu.size": 1 << 20,
            "gpu.page_size": 4096,
            "cpu.size": 1 << 20,
            "cpu.page_size": 4096,
        }
    )
    with TieredStore(config, FP) as store:
        chunks, kvs = kv_chunks(3)
        store.tiers[1].backend.put(chunks)
        outs = [torch.empty_like(kv) for kv in kvs]
        store.get([c.key for c in chunks], outs)
        assert all(torch.equal(o, kv) for o, kv in zip(outs, kvs, strict=True))
        assert store.tiers[0].backend.contains([c.key for c in chunks]) == 3


def test_gds_round_trip_into_device_buffers(tmp_path):
    pytest.importorskip("kvikio", reason="pip install 'kvstore[gpu]'")
    b = create_backend("gds", path=str(tmp_path), capacity=1 << 22)
    chunks, kvs = kv_chunks(3)
    device_chunks = [
        c._replace(payload=kv.view(torch.uint8).reshape(-1))
        for c, kv in zip(chunks, kvs, strict=True)
    ]
    assert b.put(device_chunks) == [True] * 3
    outs = [torch.empty_like(kv) for kv in kvs]
    got = b.get([c.key for c in chunks], outs)
    for g, out, kv, c in zip(got, outs, kvs, chunks, strict=True):
        assert torch.equal(out, kv)
        verify(g, c.key, FP.digest())
    # The files are ordinary chunk files: the disk tier reads them after a restart.
    disk = create_backend("disk", path=str(tmp_path), capacity=1 << 22)
    assert disk.contains([c.key for c in chunks]) == 3
    assert bytes(disk.get([chunks[0].key])[0].payload) == bytes(chunks[0].payload)


def test_store_with_gds_tier_uses_kvikio(tmp_path):
    pytest.importorskip("kvikio", reason="pip install 'kvstore[gpu]'")
    config = from_flat(
        {
            "tiers": "cpu,gds",
            "cpu.size": 1 << 20,
            "cpu.page_size": 4096,
            "gds.path": str(tmp_path),
            "gds.size": 1 << 22,
        }
    )
    with TieredStore(config, FP) as store:
        assert store.tiers[1].backend.name == "gds"
        chunks, kvs = kv_chunks(2)
        assert store.put(chunks) == 2
        store.tiers[0].backend.delete([c.key for c in chunks])
        got = store.get([c.key for c in chunks])
        assert all(g is not None for g in got) and store.stats()["gds"].hits == 2
