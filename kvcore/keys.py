"""The one key: block hashes and chunk keys shared by engine, connector, store and router.

Every component that names KV by content imports from here; nothing else hashes tokens.

Block hashes follow vLLM's ``sha256_cbor`` scheme so that KV events from vLLM and from
this engine speak the same hashes::

    hash(block) = sha256(cbor_canonical((parent_hash, tuple(token_ids), extra_keys)))

* ``parent_hash`` of the first block is ``NONE_HASH = sha256(cbor_canonical("0"))`` — the
  value vLLM uses when started with ``PYTHONHASHSEED=0``. It is fixed: never Python's
  ``hash()``, never a per-process random seed, so two processes on two machines agree.
* ``extra_keys`` is ``None`` or a tuple. As in vLLM, the LoRA name is part of every
  block's extra keys and the cache salt only of the first block; because hashes chain,
  the salt still separates every later block (tenants never share KV).

Only full blocks are hashed. A chunk (``chunk_size`` tokens, a multiple of
``block_size``) is named by its last block's hash bound to the model fingerprint, since
the chained hash already identifies every token before it. A salted request's chunk
keys also carry the salt's tag in the clear (``<16 hex>.<64 hex>``, ``chunk_key``), so a
daemon can hold a tenant's token to its own keys::

    tokens   |b0|b1|b2|b3|b4|b5|b6|b7|b8|b9|     (block_size tokens each)
    chunks   |   c0 = key(b3)  |   c1 = key(b7)  |  b8,b9: partial chunk key(b9)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cbor2
import xxhash

BLOCK_HASH_SEED = "0"
"""Seed of the first parent hash; equal to vLLM's ``init_none_hash`` with PYTHONHASHSEED=0."""

BlockHash = bytes


def sha256_cbor(obj: Any) -> bytes:
    """SHA-256 of the canonical CBOR encoding of ``obj`` (vLLM's ``sha256_cbor``)."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


NONE_HASH: BlockHash = sha256_cbor(BLOCK_HASH_SEED)


def block_extra_keys(
    block_index: int, cache_salt: str | None = None, lora_name: str | None = None
) -> tuple | None:
    """Extra keys of block ``block_index``: LoRA name on every block, salt on the first."""
    keys: list[Any] = []
    if lora_name:
        keys.append(lora_name)
    if cache_salt and block_index == 0:
        keys.append(cache_salt)
    return tuple(keys) if keys else None


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple | None = None
) -> BlockHash:
    """Hash one block of tokens chained to its parent block's hash."""
    parent = NONE_HASH if parent is None else parent
    return sha256_cbor((parent, tuple(int(t) for t in token_ids), extra_keys))


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    cache_salt: str | None = None,
    lora_name: str | None = None,
    start: int = 0,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Chained hashes of the full blocks of ``token_ids``.

    ``start`` (a block index) and ``parent`` resume an earlier computation: pass the
    number of blocks already hashed and the last of those hashes.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out: list[BlockHash] = []
    n_full = len(token_ids) // block_size
    for i in range(start, n_full):
        toks = token_ids[i * block_size : (i + 1) * block_size]
        parent = hash_block(parent, toks, block_extra_keys(i, cache_salt, lora_name))
        out.append(parent)
    return out


@dataclass(frozen=True, slots=True)
class ModelFingerprint:
    """Everything that changes the bytes of the KV: a stored chunk binds all of it.

    ``model`` is the model identity (HF name + revision, preset name, or a path) and
    ``weights_digest`` a digest of the weights, so two checkpoints with one name differ.
    """

    model: str
    weights_digest: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str = "LTHD"  # payload [layers, 2, tokens, kv_heads, head_dim]
    tp_rank: int = 0
    tp_size: int = 1

    def digest(self) -> bytes:
        """Stable 32-byte digest of every field (sorted, canonical CBOR)."""
        return sha256_cbor(sorted(asdict(self).items()))


_READ = 8 << 20


def checkpoint_digest(directory: str | Path) -> str:
    """xxh3-128 over a checkpoint directory's safetensors files (names and bytes, in name
    order), streamed: the weights digest of a fingerprint. Any engine that loads the same
    files computes the same digest, whatever path it finds them under."""
    h = xxhash.xxh3_128()
    for f in sorted(Path(directory).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(_READ):
                h.update(block)
    return "xxh3-128:" + h.hexdigest()


SALT_TAG_CHARS = 16
"""Hex characters of a salt tag: 64 bits, enough that two tenants' salts never meet."""


def salt_tag(cache_salt: str) -> str:
    """The tag of ``cache_salt`` that prefixes its chunks' keys (16 hex characters).

    A one-way digest, so a key shows which tenant wrote it without showing the salt;
    the daemon binds a tenant's token to the same tag (store/daemon/auth.py)."""
    return hashlib.sha256(b"kvstore-salt\0" + cache_salt.encode()).digest()[:8].hex()


def key_salt_tag(key: str) -> str | None:
    """The salt tag a chunk key carries (``"<tag>.<hex>"``), or None for an unsalted key."""
    return key[:SALT_TAG_CHARS] if len(key) > 64 and key[SALT_TAG_CHARS] == "." else None


def chunk_key(
    fingerprint: ModelFingerprint | bytes,
    last_block_hash: BlockHash,
    cache_salt: str | None = None,
) -> str:
    """Store key of the chunk ending with the block whose hash is ``last_block_hash``:
    64 hex characters, after ``"<salt_tag(cache_salt)>."`` for a salted request.

    The salt is already in the block hash (tenants never share a key); the tag says so
    in the clear, so a daemon can let a tenant's token touch only its own keys."""
    fp = fingerprint.digest() if isinstance(fingerprint, ModelFingerprint) else fingerprint
    key = sha256_cbor((fp, last_block_hash)).hex()
    return f"{salt_tag(cache_salt)}.{key}" if cache_salt else key


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a token sequence: its store key and the token range it covers."""

    key: str
    start: int  # first token index
    end: int  # one past the last token index


def chunk_refs(
    hashes: Sequence[BlockHash],
    block_size: int,
    chunk_size: int,
    fingerprint: ModelFingerprint | bytes,
    *,
    include_partial: bool = False,
    cache_salt: str | None = None,
) -> list[ChunkRef]:
    """Chunks over the blocks whose chained ``hashes`` are given (``cache_salt``: the
    request's, which tags the keys, see ``chunk_key``).

    Full chunks always; with ``include_partial`` the trailing run of full blocks that does
    not fill a chunk becomes one more (shorter) chunk.
    """
    if chunk_size % block_size:
        raise ValueError(f"chunk_size {chunk_size} is not a multiple of block_size {block_size}")
    fp = fingerprint.digest() if isinstance(fingerprint, ModelFingerprint) else fingerprint
    per_chunk = chunk_size // block_size
    tag = f"{salt_tag(cache_salt)}." if cache_salt else ""  # once, not per chunk
    refs = []
    for first in range(0, len(hashes), per_chunk):
        last = min(first + per_chunk, len(hashes))
        if last - first < per_chunk and not include_partial:
            break
        key = tag + chunk_key(fp, hashes[last - 1])
        refs.append(ChunkRef(key, first * block_size, last * block_size))
    return refs
