"""KV events of the store's tiers: BlockStored only for what a tier stored, BlockRemoved
when a tier evicts, demotions and promotions as moves between media."""

from __future__ import annotations

import pytest
from connector_cases import CHUNK, PROMPT_LEN, checkpoint, prompts, run, store_config, tiered_llm

from kvcore.events import BlockRemoved, BlockStored

CHUNK_BYTES = 2 * 2 * CHUNK * 2 * 32 * 4  # layers * (k, v) * tokens * kv heads * head_dim * f32
WHOLE = PROMPT_LEN // CHUNK  # 4 whole chunks per prompt = 8 blocks


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = checkpoint(tmp_path_factory.mktemp("ckpt"))
    a, _ = prompts(seed=3)
    other, _ = prompts(seed=4)
    return model, a, other


def hashes_of(llm, prompt: list[int]) -> list:
    req = llm.engine.add_request(prompt, request_id="probe")
    llm.engine.abort_request("probe")
    return list(req.block_hashes[: WHOLE * CHUNK // 16])


def store_events(llm) -> list[tuple[str, str, list]]:
    """(kind, medium, block hashes) of the connector's events since the last call."""
    llm.engine.connector.flush()
    out = []
    for e in llm.engine.take_kv_events():
        if isinstance(e, BlockStored | BlockRemoved) and e.medium != "GPU":
            out.append((type(e).__name__, e.medium, list(e.block_hashes)))
    return out


def blocks(events: list[tuple[str, str, list]], kind: str, medium: str) -> list:
    """The block hashes of every ``kind`` event of ``medium``, in order."""
    return [h for k, m, hs in events if (k, m) == (kind, medium) for h in hs]


def small_cpu(tmp_path, tiers: str, **extra) -> dict:
    """A cpu tier of exactly one prompt's whole chunks, evicting in LRU order."""
    return store_config(
        tiers,
        tmp_path,
        **{
            "cpu.size": WHOLE * CHUNK_BYTES,
            "cpu.page_size": CHUNK_BYTES // 2,
            "cpu.policy": "lru",
            **extra,
        },
    )


def test_a_cpu_eviction_is_a_block_removed(case, tmp_path):
    model, a, other = case
    with tiered_llm(model, small_cpu(tmp_path, "cpu"), enable_kv_events=True) as llm:
        ha, ho = hashes_of(llm, a), hashes_of(llm, other)
        run(llm, a)
        assert store_events(llm) == [("BlockStored", "CPU", ha)]
        run(llm, other)  # its 4 chunks take the place of a's
        # the put evicts a's chunks as it reserves room, then reports what it stored
        assert store_events(llm) == [("BlockRemoved", "CPU", ha), ("BlockStored", "CPU", ho)]
        assert len(llm.engine.connector.residency) == WHOLE  # a's chunks are forgotten


def test_a_demotion_moves_blocks_from_cpu_to_disk_and_a_load_back(case, tmp_path):
    model, a, other = case
    cfg = small_cpu(tmp_path, "cpu,disk", write_policy="write_back")
    with tiered_llm(model, cfg, enable_kv_events=True) as llm:
        ha, ho = hashes_of(llm, a), hashes_of(llm, other)
        run(llm, a)
        assert store_events(llm) == [("BlockStored", "CPU", ha)]  # write-back: not on disk yet
        run(llm, other)
        events = store_events(llm)
        assert blocks(events, "BlockRemoved", "CPU") == ha
        assert blocks(events, "BlockStored", "DISK") == ha
        out = run(llm, a)  # loads from disk, promoting a's chunks into the cpu tier again
        assert out.metrics.kv_sources == {"engine": 0, "disk": WHOLE * CHUNK}
        events = store_events(llm)
        assert blocks(events, "BlockStored", "CPU") == ha
        assert blocks(events, "BlockRemoved", "CPU") == ho
        assert blocks(events, "BlockRemoved", "DISK") == []


def test_block_stored_only_names_tiers_that_stored_the_chunk(case, tmp_path):
    """The disk tier is smaller than one chunk file: every put to it fails, so no DISK."""
    model, a, _ = case
    cfg = store_config("cpu,disk", tmp_path, **{"disk.size": CHUNK_BYTES // 2})
    with tiered_llm(model, cfg, enable_kv_events=True) as llm:
        run(llm, a)
        events = store_events(llm)
        assert [(kind, m) for kind, m, _ in events] == [("BlockStored", "CPU")]
        assert llm.engine.connector.store.stats()["disk"].put_failures == WHOLE


def test_events_off_keeps_no_residency(case, tmp_path):
    model, a, _ = case
    with tiered_llm(model, small_cpu(tmp_path, "cpu")) as llm:
        run(llm, a)
        assert llm.engine.connector.residency is None
        assert llm.engine.take_kv_events() == []
        assert llm.engine.connector.store.tiers[0].backend.on_evict is None  # no copy per eviction
