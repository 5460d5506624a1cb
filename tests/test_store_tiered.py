"""TieredStore: prefix continuity, promotion, write policies, pins, verification, metrics."""

from __future__ import annotations

import os

import numpy as np
import pytest

from backends.base import create_backend
from kvcore.chunk import make_chunk
from kvcore.keys import ModelFingerprint, block_hashes, chunk_refs
from store.config import from_flat
from store.tiered import TieredStore

FP = ModelFingerprint("tiny", "sha:0", "uint8", num_layers=1, num_kv_heads=1, head_dim=1)
SIZE = 1024  # payload bytes per chunk


def keys(n: int, salt: str = "") -> list[str]:
    hashes = block_hashes(list(range(16 * n)), 16, cache_salt=salt or None)
    return [r.key for r in chunk_refs(hashes, 16, 16, FP)]


def payload(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, SIZE, dtype=np.uint8).reshape(1, 2, -1, 1, 1)


def chunks(store: TieredStore, ks: list[str]):
    return [store.make_chunk(k, payload(i), 16) for i, k in enumerate(ks)]


def make_store(tmp_path, tiers="cpu,disk", cpu_chunks=64, **flat):
    """A store with tiny tiers: ``cpu_chunks`` chunks of RAM, 64 of disk."""
    config = from_flat(
        {
            "tiers": tiers,
            "cpu.size": cpu_chunks * SIZE,
            "cpu.page_size": SIZE,
            "disk.path": str(tmp_path / "disk"),
            "disk.size": 64 * (SIZE + 4096),
            **flat,
        }
    )
    return TieredStore(config, FP)


def test_lookup_follows_the_prefix_across_tiers(tmp_path):
    with make_store(tmp_path) as store:
        ks = keys(4)
        cs = chunks(store, ks)
        cpu, disk = store.tiers[0].backend, store.tiers[1].backend
        cpu.put([cs[0], cs[2]])
        disk.put([cs[1]])
        assert store.lookup(ks) == 3  # c0 cpu, c1 disk, c2 cpu, c3 nowhere
        assert store.locate(ks) == ["cpu", "disk", "cpu"]
        disk.delete([ks[1]])
        assert store.lookup(ks) == 1  # the hole at c1 ends the prefix, c2 does not count
        assert store.lookup([]) == 0


def test_get_promotes_hits_from_lower_tiers(tmp_path):
    with make_store(tmp_path) as store:
        ks = keys(3)
        store.put(chunks(store, ks))
        store.tiers[0].backend.delete(ks)
        outs = [np.zeros(SIZE, np.uint8) for _ in ks]
        got = store.get(ks, outs)
        assert all(np.array_equal(o, payload(i).reshape(-1)) for i, o in enumerate(outs))
        assert [g.key for g in got] == ks
        assert store.tiers[0].backend.contains(ks) == 3
        stats = store.stats()
        assert stats["cpu"].misses == 3 and stats["disk"].hits == 3 and stats["cpu"].hits == 0
        store.check_integrity()


def test_write_through_writes_every_tier(tmp_path):
    with make_store(tmp_path) as store:
        ks = keys(5)
        assert store.put(chunks(store, ks)) == 5
        assert store.tiers[0].backend.contains(ks) == 5 and store.tiers[1].backend.contains(ks) == 5


def test_write_back_demotes_on_eviction(tmp_path):
    with make_store(
        tmp_path, cpu_chunks=4, write_policy="write_back", **{"cpu.policy": "lru"}
    ) as store:
        ks = keys(6)
        assert store.put(chunks(store, ks)) == 6
        cpu, disk = store.tiers[0].backend, store.tiers[1].backend
        assert disk.contains(ks[:2]) == 2 and disk.usage().items == 2  # only the evicted two
        assert cpu.contains(ks[2:]) == 4
        assert store.stats()["cpu"].evictions == 2
        assert (
            store.metrics.registry.get_sample_value("kvstore_tier_evictions_total", {"tier": "cpu"})
            == 2
        )
        assert store.lookup(ks) == 6
        got = store.get(ks)
        assert all(
            np.array_equal(np.asarray(g.payload), payload(i).reshape(-1)) for i, g in enumerate(got)
        )
        store.check_integrity()


def test_pinned_chunks_are_never_evicted(tmp_path):
    with make_store(tmp_path, tiers="cpu", cpu_chunks=4) as store:
        ks = keys(10)
        cs = chunks(store, ks)
        store.put(cs[:1])
        store.pin(ks[:1])
        for c in cs[1:]:
            store.put([c])
        assert store.tiers[0].backend.contains(ks[:1]) == 1
        store.unpin(ks[:1])
        store.put(cs[1:5])  # now it may go
        assert store.tiers[0].backend.usage().items == 4


def test_full_of_pinned_chunks_refuses_the_put(tmp_path):
    with make_store(tmp_path, tiers="cpu", cpu_chunks=2) as store:
        ks = keys(3)
        cs = chunks(store, ks)
        store.put(cs[:2])
        store.pin(ks[:2])
        assert store.put(cs[2:]) == 0
        assert store.stats()["cpu"].put_failures == 1
        assert store.lookup(ks[:2]) == 2


def test_flipped_checksum_is_a_miss_a_metric_and_dropped(tmp_path):
    with make_store(tmp_path, tiers="disk") as store:
        ks = keys(3)
        store.put(chunks(store, ks))
        path = store.tiers[0].backend.path_of(ks[1])
        with open(path, "r+b") as f:
            f.seek(-10, os.SEEK_END)
            byte = f.read(1)
            f.seek(-10, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0x01]))
        got = store.get(ks)
        assert got[1] is None and got[0] is not None and got[2] is not None
        assert np.array_equal(np.asarray(got[2].payload), payload(2).reshape(-1))
        assert store.stats()["disk"].checksum_failures == 1
        assert not os.path.exists(path) and store.lookup(ks) == 1
        store.check_integrity()


def test_a_chunk_of_another_model_is_never_returned(tmp_path):
    with make_store(tmp_path, tiers="disk") as store:
        k = keys(1)[0]
        foreign = make_chunk(k, b"\x09" * 32, payload(0), 16)  # same key, other fingerprint
        store.tiers[0].backend.put([foreign])
        assert store.get([k]) == [None]
        assert store.stats()["disk"].checksum_failures == 1 and store.lookup([k]) == 0


def test_metrics_are_per_store_and_exported(tmp_path):
    with make_store(tmp_path, tiers="cpu") as a, make_store(tmp_path / "b", tiers="cpu") as b:
        ks = keys(2)
        a.put(chunks(a, ks))
        a.get(ks)
        reg = a.metrics.registry
        assert reg.get_sample_value("kvstore_tier_hits_total", {"tier": "cpu"}) == 2
        assert reg.get_sample_value("kvstore_tier_written_bytes_total", {"tier": "cpu"}) == 2 * SIZE
        assert reg.get_sample_value("kvstore_tier_items", {"tier": "cpu"}) == 2
        assert (
            reg.get_sample_value("kvstore_tier_op_seconds_count", {"tier": "cpu", "op": "get"}) == 1
        )
        assert b.metrics.registry.get_sample_value("kvstore_tier_hits_total", {"tier": "cpu"}) in (
            None,
            0,
        )


def test_async_get_put_and_prefetch(tmp_path):
    with make_store(tmp_path) as store:
        ks = keys(3)
        assert store.put_async(chunks(store, ks)).result(10) == 3
        store.tiers[0].backend.delete(ks)
        assert store.prefetch(ks).result(10) == 3
        assert store.tiers[0].backend.contains(ks) == 3
        got = store.get_async(ks).result(10)
        assert [g.key for g in got] == ks


def test_put_async_builds_chunks_on_the_executor(tmp_path):
    """A builder (the connector's host copy and checksums) runs off the caller's thread."""
    import threading

    with make_store(tmp_path) as store:
        ks = keys(2)
        built_on = []

        def build():
            built_on.append(threading.get_ident())
            return chunks(store, ks)

        assert store.put_async(build).result(10) == 2
        assert built_on and built_on[0] != threading.get_ident()
        assert store.lookup(ks) == 2


def test_make_chunk_needs_a_fingerprint(tmp_path):
    config = from_flat({"tiers": "cpu", "cpu.size": 4 * SIZE, "cpu.page_size": SIZE})
    with TieredStore(config) as store, pytest.raises(ValueError, match="fingerprint"):
        store.make_chunk("k" * 64, payload(0), 16)


def test_gds_without_a_gpu_is_served_by_disk(tmp_path, caplog):
    config = from_flat(
        {
            "tiers": "cpu,gds",
            "cpu.size": 4 * SIZE,
            "cpu.page_size": SIZE,
            "gds.path": str(tmp_path / "gds"),
            "gds.size": 1 << 20,
        }
    )
    with TieredStore(config, FP) as store:
        assert [t.name for t in store.tiers] == ["cpu", "gds"]
        assert store.tiers[1].backend.name in ("disk", "gds")
        ks = keys(1)
        store.put(chunks(store, ks))
        assert store.tiers[1].backend.contains(ks) == 1
    if store.tiers[1].backend.name == "disk":
        assert "the disk backend serves tier 'gds'" in caplog.text


def test_unknown_backend_and_missing_dependency_messages():
    from backends.base import BackendUnavailable, backend_class

    with pytest.raises(ValueError, match="unknown backend 'tape'"):
        create_backend("tape")
    try:
        backend_class("gds")(path="/tmp/x", capacity=1)
    except BackendUnavailable as exc:
        assert "kvstore[gpu]" in str(exc) or "CUDA" in str(exc)


def test_disk_eviction_hands_the_victim_to_the_next_tier(tmp_path):
    """Demotion out of a file-backed tier reads the victim file while holding its lock."""
    from backends.cpu import CPUBackend
    from backends.disk import DiskBackend

    disk = DiskBackend(str(tmp_path / "d"), capacity=2 * (SIZE + 4096), policy="lru")
    sink = CPUBackend(capacity=16 * SIZE, page_size=SIZE)
    disk.on_evict = lambda chunk: sink.put([chunk])
    ks = keys(4)
    cs = [make_chunk(k, FP.digest(), payload(i), 16) for i, k in enumerate(ks)]
    disk.put(cs)
    assert disk.contains(ks[2:]) == 2 and sink.contains(ks[:2]) == 2
    got = sink.get(ks[:2])
    assert all(
        bytes(np.asarray(g.payload)) == bytes(c.payload) for g, c in zip(got, cs[:2], strict=True)
    )


def test_write_back_tier_takes_what_the_tier_above_refuses(tmp_path):
    with make_store(tmp_path, cpu_chunks=2, write_policy="write_back") as store:
        big = make_chunk(keys(1, salt="big")[0], FP.digest(), np.zeros(3 * SIZE, np.uint8), 16)
        assert store.put([big]) == 1  # larger than the whole cpu tier: lands on disk
        assert store.tiers[0].backend.contains([big.key]) == 0
        assert store.tiers[1].backend.contains([big.key]) == 1


def test_a_batch_larger_than_the_cpu_tier_keeps_its_tail(tmp_path):
    with make_store(tmp_path, tiers="cpu", cpu_chunks=4, **{"cpu.policy": "lru"}) as store:
        ks = keys(10)
        assert store.put(chunks(store, ks)) == 10
        assert store.tiers[0].backend.contains(ks[6:]) == 4
        store.check_integrity()


def test_a_verifying_memory_tier_catches_a_flipped_byte(tmp_path):
    with make_store(tmp_path, **{"cpu.verify": "true"}) as store:
        ks = keys(2)
        store.put(chunks(store, ks))
        cpu = store.tiers[0].backend
        offset = cpu._entries[ks[0]].runs[0].offset
        cpu.pool.buf[offset + 7] ^= 0xFF  # a bit flip in RAM
        got = store.get(ks)
        assert store.stats()["cpu"].checksum_failures == 1
        assert np.array_equal(np.asarray(got[0].payload), payload(0).reshape(-1))  # from disk
        assert store.stats()["disk"].hits == 1
        # The bad copy was dropped and the good one promoted back into RAM.
        (again,) = cpu.get(ks[:1])
        assert np.array_equal(np.asarray(again.payload), payload(0).reshape(-1))


def test_put_says_which_tier_stored_which_chunk(tmp_path):
    with make_store(tmp_path, cpu_chunks=2, write_policy="write_back") as store:
        ks = keys(2)
        big = make_chunk(keys(1, salt="big")[0], FP.digest(), np.zeros(3 * SIZE, np.uint8), 16)
        result = store.put([chunks(store, ks)[0], big])
        assert result == 2  # still the count of chunks some tier holds
        assert result.by_tier == {"cpu": [True, False], "disk": [False, True]}
        assert result.stored == [True, True]
        store.pin(ks[:1])
        full = store.put(
            [
                make_chunk(k, FP.digest(), np.zeros(2 * SIZE, np.uint8), 16)
                for k in keys(2, salt="pinned")
            ]
        )
        assert full.by_tier["cpu"] == [False, False] and full.by_tier["disk"] == [True, True]
        assert store.put_async(chunks(store, ks)).result(10).by_tier["cpu"] == [True, True]


def test_listeners_see_puts_moves_evictions_and_drops(tmp_path):
    with make_store(
        tmp_path, cpu_chunks=2, write_policy="write_back", **{"cpu.policy": "lru"}
    ) as store:
        seen = []
        store.subscribe(seen.append)
        ks = keys(3)
        store.put(chunks(store, ks))  # the third evicts the first into disk
        assert seen == [
            ("disk", (ks[0],), False),
            ("cpu", (ks[0],), True),
            ("cpu", tuple(ks), False),
        ]
        seen.clear()
        store.get(ks[:1])  # a disk hit is promoted into cpu, evicting ks[1] into disk
        assert seen == [
            ("disk", (ks[1],), False),
            ("cpu", (ks[1],), True),
            ("cpu", (ks[0],), False),
        ]
        seen.clear()
        store.delete(ks[2:])
        assert seen == [("cpu", (ks[2],), True), ("disk", (ks[2],), True)]


def test_listeners_see_corrupt_chunks_dropped(tmp_path):
    with make_store(tmp_path, tiers="disk") as store:
        ks = keys(1)
        store.put(chunks(store, ks))
        seen = []
        store.subscribe(seen.append)
        with open(store.tiers[0].backend.path_of(ks[0]), "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)[0]
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last ^ 0xFF]))
        assert store.get(ks) == [None]
        assert seen == [("disk", (ks[0],), True)]


def test_an_evicting_tier_reports_only_with_a_listener(tmp_path):
    with make_store(tmp_path, tiers="cpu", cpu_chunks=2) as store:
        assert store.tiers[0].backend.on_evict is None  # no payload copy per eviction
        seen = []
        store.subscribe(seen.append)
        ks = keys(3)
        store.put(chunks(store, ks))
        assert ("cpu", (ks[0],), True) in seen


def test_get_layers_hands_over_verified_chunks_layer_by_layer(tmp_path):
    with make_store(tmp_path, tiers="cpu") as store:
        ks = keys(2)
        kv = [
            np.random.default_rng(i).integers(0, 256, (3, 2, 16, 1, 1), dtype=np.uint8)
            for i in range(2)
        ]
        store.put([store.make_chunk(k, x, 16) for k, x in zip(ks, kv, strict=True)])
        calls = []

        def sink(layer, got):
            calls.append((layer, [g.key if g is not None else None for g in got]))
            return layer < 1  # stop after layer 1

        got = store.get_layers_async(ks + keys(1, salt="x"), None, sink).result(10)
        assert calls == [(0, [*ks, None]), (1, [*ks, None])]
        assert [g.key for g in got[:2]] == ks and got[2] is None
        assert store.get_layers_async(keys(1, salt="x"), None, sink).result(10) == [None]
        assert len(calls) == 2  # nothing found: no layer to hand over


def test_borrow_lends_first_tier_hits_only_and_give_back_unpins(tmp_path):
    store = make_store(tmp_path)
    ks = keys(3, "lend")
    store.put(chunks(store, ks[:2]))
    store.tiers[0].backend.delete([ks[1]])  # only on disk now
    lent = store.borrow(ks)
    assert lent[1] is None and lent[2] is None  # below the first tier, or nowhere: get it
    header, views = lent[0]
    assert header.key == ks[0] and b"".join(bytes(v) for v in views) == payload(0).tobytes()
    assert store.tiers[0].backend._pins.__contains__(ks[0])
    store.give_back([ks[0]])
    assert not store.tiers[0].backend._pins.__contains__(ks[0])
    store.close()
    checking = make_store(tmp_path, **{"cpu.verify": True})  # a verifying tier lends nothing
    checking.put(chunks(checking, ks[:1]))
    assert checking.borrow(ks[:1]) == [None]
    checking.close()
