"""The CPU paged decode kernel against gather + SDPA on the same paged cache."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.attention import allowed_keys, gather_kv
from engine.errors import InvalidRequestError
from engine.paged_kernel import load

BS = 16


@pytest.fixture(scope="module")
def kernel():
    k = load()
    assert k is not None, (
        "the paged kernel must build here (a C++ compiler and ninja are installed)"
    )
    return k


def paged_case(
    lens: list[int], heads: int, kv_heads: int, dtype: torch.dtype, seed: int = 0, dim: int = 64
):
    """A shuffled paged cache holding sequences of ``lens`` tokens, their tables and queries."""
    torch.manual_seed(seed)
    widths = [-(-n // BS) for n in lens]
    num_blocks = sum(widths) + 3
    kv = torch.randn(num_blocks, 2, BS, kv_heads, dim).to(dtype)
    free = torch.randperm(num_blocks).tolist()
    width = max(widths)
    tables = []
    for w in widths:
        tables.append(free[:w] + [0] * (width - w))
        free = free[w:]
    q = torch.randn(len(lens), heads, dim).to(dtype)
    return q, kv, torch.tensor(tables), torch.tensor([n - 1 for n in lens])


def sdpa_reference(q, kv, tables, positions, window):
    b, h, d = q.shape
    kvh = kv.shape[3]
    keys, vals = gather_kv(kv.float(), tables)
    mask = allowed_keys(positions, tables.shape[1] * BS, window, torch.device("cpu"))[
        :, None, None, :
    ]
    o = F.scaled_dot_product_attention(
        q.float().view(b, kvh, h // kvh, d), keys, vals, attn_mask=mask, scale=d**-0.5
    )
    return o.view(b, h, d)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "dtype", "tol", "dim"),
    [
        (12, 4, None, torch.float32, 1e-5, 64),
        (8, 8, None, torch.float32, 1e-5, 64),  # no GQA
        (8, 1, None, torch.float32, 1e-5, 64),  # multi-query
        (12, 4, 40, torch.float32, 1e-5, 64),  # sliding window: a first block begun midway
        (12, 4, None, torch.bfloat16, 2e-2, 64),
        (8, 2, None, torch.float32, 1e-5, 128),  # the other vectorised head size
        (6, 2, 23, torch.float32, 1e-5, 80),  # a head size only the generic loop takes
    ],
)
def test_kernel_matches_gather_and_sdpa(kernel, heads, kv_heads, window, dtype, tol, dim):
    rng = random.Random(heads * 100 + kv_heads)
    lens = [1, 2, 15, 16, 17, 31, 32, 33, 48] + [rng.randrange(1, 700) for _ in range(20)]
    q, kv, tables, positions = paged_case(lens, heads, kv_heads, dtype, dim=dim)
    out = torch.full_like(q, float("nan"))
    kernel.paged_decode(q, out, kv, tables, positions, window or 0, dim**-0.5)
    ref = sdpa_reference(q, kv, tables, positions, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_kernel_reads_only_its_own_blocks(kernel):
    """Garbage (NaN) in every block a sequence does not own never reaches its output."""
    q, kv, tables, positions = paged_case([20, 50], 4, 2, torch.float32)
    owned = set(tables[0, :2].tolist()) | set(tables[1, :4].tolist())
    for blk in range(kv.shape[0]):
        if blk not in owned:
            kv[blk] = float("nan")
    kv[tables[0, 1], :, 4:] = float("nan")  # slots past position 19 of sequence 0
    kv[tables[1, 3], :, 2:] = float("nan")  # past position 49 of sequence 1
    out = torch.empty_like(q)
    kernel.paged_decode(q, out, kv, tables, positions, 0, 0.125)
    assert not out.isnan().any()


def test_kernel_rejects_mismatched_inputs(kernel):
    q, kv, tables, positions = paged_case([20, 50], 4, 2, torch.float32)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="int64"):
        kernel.paged_decode(q, out, kv, tables.int(), positions, 0, 0.125)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        kernel.paged_decode(q.double(), out.double(), kv, tables, positions, 0, 0.125)
    with pytest.raises(RuntimeError, match="one block table row"):
        kernel.paged_decode(q, out, kv, tables[:1], positions, 0, 0.125)


def test_engine_tokens_equal_with_either_attention_backend():
    prompts = [[5 + (i * 7) % 400 for i in range(n)] for n in (3, 40, 130, 257)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    paged = LLM("tiny", device="cpu", attention_backend="paged").generate(prompts, params)
    sdpa = LLM("tiny", device="cpu", attention_backend="sdpa").generate(prompts, params)
    assert [o.token_ids for o in paged] == [o.token_ids for o in sdpa]


def test_unknown_attention_backend_is_refused():
    with pytest.raises(
        InvalidRequestError, match="attention_backend must be one of auto, paged, sdpa"
    ):
        LLM("tiny", attention_backend="flash")
