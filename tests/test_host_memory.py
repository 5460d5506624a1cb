"""KV cache tensors on huge pages: zero-filled, writable, the right shape, kept alive."""

from __future__ import annotations

import gc

import torch

from engine.host_memory import MIN_BYTES, zeros_on_huge_pages


def test_a_large_tensor_is_a_zeroed_page_aligned_mapping():
    shape = (64, 2, 16, 4, 64)  # 2 MiB of float32; 8 MiB in all
    t = zeros_on_huge_pages((4, *shape), torch.float32)
    assert t.shape == (4, *shape) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.nbytes >= MIN_BYTES and t.data_ptr() % 4096 == 0
    assert not t.any()
    view = t[1:3]
    del t
    gc.collect()
    view.fill_(2.5)  # the mapping lives as long as any view of it
    assert float(view.sum()) == 2.5 * view.numel()


def test_small_tensors_and_other_dtypes():
    small = zeros_on_huge_pages((3, 5), torch.float32)
    assert small.shape == (3, 5) and not small.any()
    half = zeros_on_huge_pages((1024, 2048), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == (1024, 2048) and not half.any()
    half[7, 9] = 1.5
    assert float(half.sum()) == 1.5
