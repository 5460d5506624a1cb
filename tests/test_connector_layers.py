"""Loads land layer by layer: layer i's wait returns once layer i is in the paged cache,
and a load given up at its deadline writes nothing more (the worker side, no model)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from connector.base import ConnectorContext
from connector.plan import LoadSpec, SaveSpec, TieredConnectorMetadata
from connector.tiered import TieredConnector
from kvcore.keys import ModelFingerprint, block_hashes, chunk_refs

LAYERS, KVH, D, BS, CHUNK = 3, 2, 4, 16, 32
NUM_BLOCKS = 8
FP = ModelFingerprint("layers", "sha:0", "float32", LAYERS, KVH, D)


def connector(timeout: float = 5.0) -> TieredConnector:
    cfg = {"tiers": "cpu", "chunk_size": CHUNK, "cpu.size": "1MiB", "cpu.page_size": "4KiB"}
    ctx = ConnectorContext(
        FP, BS, LAYERS, KVH, D, torch.float32, torch.device("cpu"), cfg, load_timeout=timeout
    )
    conn = TieredConnector(ctx)
    conn.register_kv_caches([torch.zeros(NUM_BLOCKS, 2, BS, KVH, D) for _ in range(LAYERS)])
    return conn


def stored_chunks(conn: TieredConnector, n: int) -> tuple[list[str], list[torch.Tensor]]:
    """``n`` chunks of random KV put into the store; their keys and payloads."""
    hashes = block_hashes(list(range(CHUNK * n)), BS)
    keys = [r.key for r in chunk_refs(hashes, BS, CHUNK, FP)]
    kvs = [
        torch.randn(LAYERS, 2, CHUNK, KVH, D, generator=torch.Generator().manual_seed(i))
        for i in range(n)
    ]
    made = [conn.store.make_chunk(k, kv, CHUNK) for k, kv in zip(keys, kvs, strict=True)]
    assert conn.store.put(made) == n
    return keys, kvs


def load_meta(keys: list[str], block_ids: list[int]) -> TieredConnectorMetadata:
    spec = LoadSpec(
        "r", keys, [i * CHUNK for i in range(len(keys))], 0, CHUNK * len(keys), block_ids
    )
    return TieredConnectorMetadata(loads=[spec])


def blocks_of(conn: TieredConnector, layer: int, block_ids: list[int]) -> torch.Tensor:
    """Layer ``layer`` of the paged blocks as ``[2, tokens, KVH, D]`` (a chunk's layout)."""
    kv = conn._kv_caches[layer][torch.tensor(block_ids)]  # [nb, 2, BS, KVH, D]
    return kv.transpose(0, 1).reshape(2, -1, KVH, D)


def gate_layers(conn: TieredConnector, monkeypatch, first_gated: int) -> threading.Event:
    """Make the store deliver layers from ``first_gated`` on only once the event is set."""
    gate = threading.Event()
    real = conn.store.get_layers_async

    def gated(keys, outs, sink):
        def slow_sink(layer, chunks):
            if layer >= first_gated:
                gate.wait(10)
            return sink(layer, chunks)

        return real(keys, outs, slow_sink)

    monkeypatch.setattr(conn.store, "get_layers_async", gated)
    return gate


def test_layer_i_waits_for_layer_i_only(monkeypatch):
    conn = connector()
    keys, kvs = stored_chunks(conn, 2)
    ids = [5, 1, 6, 2]
    gate = gate_layers(conn, monkeypatch, first_gated=1)
    conn.start_load_kv(load_meta(keys, ids))
    conn.wait_for_layer_load(0)  # returns although layers 1 and 2 are not delivered yet
    want = [torch.cat([kv[layer] for kv in kvs], dim=1) for layer in range(LAYERS)]
    assert torch.equal(blocks_of(conn, 0, ids), want[0])
    assert not blocks_of(conn, 1, ids).any() and not blocks_of(conn, 2, ids).any()
    gate.set()
    conn.wait_for_layer_load(1)
    conn.wait_for_layer_load(2)
    for layer in range(LAYERS):
        assert torch.equal(blocks_of(conn, layer, ids), want[layer])
    conn.wait_for_save()
    assert conn.get_block_ids_with_load_errors() == set()
    assert conn.load_error("r") is None
    assert not conn._kv_caches[0][[0, 3, 4, 7]].any()  # no other block was touched
    conn.shutdown()


def test_a_load_given_up_at_its_deadline_writes_no_later_layer(monkeypatch):
    conn = connector(timeout=0.3)
    keys, _ = stored_chunks(conn, 2)
    ids = [0, 1, 2, 3]
    gate = gate_layers(conn, monkeypatch, first_gated=1)
    conn.start_load_kv(load_meta(keys, ids))
    conn.wait_for_layer_load(0)
    start = time.monotonic()
    conn.wait_for_layer_load(1)  # layer 1 never comes in time
    assert time.monotonic() - start < 2
    conn.wait_for_layer_load(2)
    step = conn._step
    conn.wait_for_save()
    gate.set()  # the store delivers layer 1 after all: the cancelled job must drop it
    step.jobs[0].future.exception(timeout=10)
    time.sleep(0.05)
    assert not blocks_of(conn, 1, ids).any() and not blocks_of(conn, 2, ids).any()
    assert conn.get_block_ids_with_load_errors() == set(ids)  # all of it recomputes
    assert "timed out" in conn.load_error("r")
    conn.shutdown()


def test_a_missing_chunk_ends_the_load_there(monkeypatch):
    conn = connector()
    keys, kvs = stored_chunks(conn, 3)
    conn.store.delete([keys[1]])
    ids = [0, 1, 2, 3, 4, 5]
    conn.start_load_kv(load_meta(keys, ids))
    for layer in range(LAYERS):
        conn.wait_for_layer_load(layer)
    conn.wait_for_save()
    assert torch.equal(blocks_of(conn, 2, ids[:2]), kvs[0][2])  # chunk 0 loaded
    assert not blocks_of(conn, 2, ids[2:]).any()  # chunk 2 is past the hole: not written
    assert conn.get_block_ids_with_load_errors() == set(ids[2:])
    assert "missing" in conn.load_error("r")
    conn.shutdown()


def test_saves_of_a_request_whose_load_failed_are_dropped(monkeypatch):
    conn = connector(timeout=0.2)
    keys, _ = stored_chunks(conn, 1)
    gate = gate_layers(conn, monkeypatch, first_gated=0)
    other_key = "f" * 64
    meta = load_meta(keys, [0, 1])
    meta.saves.append(SaveSpec("r", other_key, CHUNK, 2 * CHUNK, [2, 3]))
    conn.start_load_kv(meta)
    for layer in range(LAYERS):
        conn.wait_for_layer_load(layer)
        conn.save_kv_layer(layer, conn._kv_caches[layer])
    conn.wait_for_save()
    gate.set()
    conn.flush()
    assert conn.store.lookup([other_key]) == 0  # computed from KV that never loaded
    assert conn.get_block_ids_with_load_errors() == {0, 1}
    conn.shutdown()


@pytest.mark.gpu
def test_layers_load_on_a_side_stream_on_cuda():
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    conn = connector()
    conn.register_kv_caches(
        [torch.zeros(NUM_BLOCKS, 2, BS, KVH, D, device="cuda") for _ in range(LAYERS)]
    )
    keys, kvs = stored_chunks(conn, 2)
    ids = [5, 1, 6, 2]
    conn.start_load_kv(load_meta(keys, ids))
    for layer in range(LAYERS):
        conn.wait_for_layer_load(layer)
        got = conn._kv_caches[layer][torch.tensor(ids, device="cuda")] * 1  # on the compute stream
        want = torch.cat([kv[layer] for kv in kvs], dim=1)
        assert torch.equal(got.transpose(0, 1).reshape(2, -1, KVH, D).cpu(), want)
    conn.wait_for_save()
    assert conn.get_block_ids_with_load_errors() == set()
    conn.shutdown()
