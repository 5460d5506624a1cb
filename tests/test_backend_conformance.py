"""One conformance suite, run against every backend this machine can run."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from backends.base import Backend, Usage, create_backend
from kvcore.chunk import Chunk, make_chunk, verify

BACKENDS = ["cpu", "disk", "redis", "valkey", "redis-cluster"]
FP = b"\x01" * 32


def chunk(i: int, size: int = 3000, tag: str = "") -> Chunk:
    kv = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).reshape(1, 2, -1, 1, 1)
    key = f"{tag}{i:04d}".rjust(64, "c")
    return make_chunk(key, FP, kv, kv.shape[2], dtype="uint8")


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Backend:
    name = request.param
    ns = f"t{uuid.uuid4().hex[:8]}:"
    if name == "cpu":
        b = create_backend("cpu", capacity=1 << 20, page_size=1024)
    elif name == "disk":
        b = create_backend("disk", path=str(tmp_path / "disk"), capacity=1 << 20)
    else:
        url = request.getfixturevalue(
            {"redis": "redis_url", "valkey": "valkey_url", "redis-cluster": "redis_cluster_url"}[
                name
            ]
        )
        b = create_backend("redis", url=url, namespace=ns)
    yield b
    b.close()


def _same(got: Chunk, want: Chunk) -> bool:
    verify(got, want.key, FP)
    return got.header == want.header and bytes(np.asarray(got.payload)) == bytes(want.payload)


def test_put_then_get_returns_the_same_chunk(backend):
    chunks = [chunk(i) for i in range(5)]
    assert backend.put(chunks) == [True] * 5
    got = backend.get([c.key for c in chunks])
    assert all(_same(g, c) for g, c in zip(got, chunks, strict=True))


def test_get_reads_into_the_callers_buffer(backend):
    c = chunk(1, size=4096)
    backend.put([c])
    out = np.full(4096 + 100, 7, dtype=np.uint8)
    (got,) = backend.get([c.key], [out])
    assert _same(got, c)
    assert np.shares_memory(np.asarray(got.payload), out)
    assert bytes(out[:4096]) == bytes(c.payload) and (out[4096:] == 7).all()


def test_missing_keys_are_none_in_order(backend):
    a, b = chunk(1), chunk(2)
    backend.put([a])
    got = backend.get([b.key, a.key, b.key])
    assert got[0] is None and got[2] is None and _same(got[1], a)


def test_contains_is_the_leading_run(backend):
    c = [chunk(i) for i in range(4)]
    backend.put([c[0], c[1], c[3]])
    assert backend.contains([x.key for x in c]) == 2
    assert backend.contains([c[2].key, c[0].key]) == 0
    assert backend.contains([c[0].key, c[1].key]) == 2
    assert backend.contains([]) == 0


def test_delete_counts_and_removes(backend):
    c = [chunk(i) for i in range(3)]
    backend.put(c)
    assert backend.delete([c[0].key, c[2].key, chunk(9).key]) == 2
    assert backend.get([x.key for x in c])[0] is None
    assert _same(backend.get([c[1].key])[0], c[1])
    assert backend.contains([c[0].key]) == 0


def test_put_of_a_present_key_keeps_one_copy(backend):
    c = chunk(5)
    assert backend.put([c, c]) == [True, True]
    assert backend.put([c]) == [True]
    assert _same(backend.get([c.key])[0], c)
    usage = backend.usage()
    assert isinstance(usage, Usage)
    if usage.items is not None:
        assert usage.items == 1


def test_usage_counts_what_is_stored(backend):
    before = backend.usage()
    backend.put([chunk(i) for i in range(3)])
    after = backend.usage()
    if before.items is None:  # a shared server cannot say
        assert after == Usage(None, None, None)
    else:
        assert after.items == before.items + 3
        assert after.bytes_used >= before.bytes_used + 3 * 3000
        assert after.bytes_capacity == 1 << 20


def test_empty_payload_and_tensor_payload_round_trip(backend):
    torch = pytest.importorskip("torch")
    kv = torch.randn(2, 2, 3, 2, 4, dtype=torch.bfloat16)
    c = make_chunk("b" * 64, FP, kv, 3)
    empty = make_chunk("e" * 64, FP, np.zeros((1, 2, 0, 1, 1), dtype=np.uint8), 0)
    assert backend.put([c, empty]) == [True, True]
    got, got_empty = backend.get([c.key, empty.key])
    from kvcore.chunk import to_tensor

    assert torch.equal(to_tensor(got), kv)
    assert got_empty.header.nbytes == 0


def test_close_is_idempotent(backend):
    backend.put([chunk(1)])
    backend.close()
    backend.close()


CAPABILITIES = {  # what each medium declares beyond Backend (backends/capabilities.py)
    "cpu": {"Lends", "Reserves", "ChecksIntegrity", "CountsEvictions"},
    "disk": {"ChecksIntegrity", "CountsEvictions"},
    "redis": set(),
    "valkey": set(),
    "redis-cluster": set(),
}


def test_each_medium_declares_exactly_its_capabilities(backend, request):
    from backends import capabilities

    kinds = ("Lends", "Reserves", "ChecksIntegrity", "CountsEvictions")
    have = {k for k in kinds if isinstance(backend, getattr(capabilities, k))}
    assert have == CAPABILITIES[request.node.callspec.params["backend"]]
