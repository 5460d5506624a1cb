"""The one key module: stable across processes, vLLM-compatible, salted, fingerprint-bound."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import cbor2

from kvcore.keys import (
    NONE_HASH,
    ModelFingerprint,
    block_hashes,
    chunk_key,
    chunk_refs,
    hash_block,
)

FP = ModelFingerprint("tiny", "abc", "float32", 2, 2, 16)


def test_seed_is_vllm_none_hash_with_pythonhashseed_0():
    # vLLM: NONE_HASH = sha256_cbor(os.getenv("PYTHONHASHSEED")); "0" encodes as 0x61 0x30
    assert NONE_HASH == hashlib.sha256(b"\x61\x30").digest()


def test_block_hash_is_sha256_of_canonical_cbor_triple():
    expected = hashlib.sha256(cbor2.dumps((NONE_HASH, (1, 2, 3), None), canonical=True)).digest()
    assert hash_block(None, [1, 2, 3]) == expected


def test_hashes_chain_and_cover_only_full_blocks():
    hs = block_hashes(list(range(10)), 4)
    assert len(hs) == 2
    assert hs[1] == hash_block(hs[0], [4, 5, 6, 7])
    assert block_hashes(list(range(10)), 4, start=1, parent=hs[0]) == hs[1:]


def test_same_hashes_in_another_process():
    code = "from kvcore.keys import block_hashes; print(block_hashes(list(range(64)), 16, cache_salt='s')[-1].hex())"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {block_hashes(list(range(64)), 16, cache_salt="s")[-1].hex()}


def test_salt_and_lora_change_every_block():
    base = block_hashes(list(range(32)), 16)
    salted = block_hashes(list(range(32)), 16, cache_salt="tenant")
    lora = block_hashes(list(range(32)), 16, lora_name="adapter")
    assert all(a != b for a, b in zip(base, salted, strict=True))
    assert all(a != b for a, b in zip(base, lora, strict=True))


def test_chunk_keys_bind_the_model_fingerprint():
    hs = block_hashes(list(range(64)), 16)
    other = ModelFingerprint("tiny", "abc", "bfloat16", 2, 2, 16)
    assert chunk_key(FP, hs[-1]) != chunk_key(other, hs[-1])
    assert chunk_key(FP, hs[-1]) == chunk_key(FP.digest(), hs[-1])


def test_chunk_refs_cover_full_chunks_and_optionally_the_tail():
    hs = block_hashes(list(range(80)), 16)  # 5 blocks
    refs = chunk_refs(hs, 16, 32, FP)
    assert [(r.start, r.end) for r in refs] == [(0, 32), (32, 64)]
    assert refs[1].key == chunk_key(FP, hs[3])
    with_tail = chunk_refs(hs, 16, 32, FP, include_partial=True)
    assert [(r.start, r.end) for r in with_tail] == [(0, 32), (32, 64), (64, 80)]
