"""Turn a scheduled step into the flat tensors one forward pass takes."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from engine.attention import AttentionMetadata, DecodeGroup, PrefillSpan, allowed_keys
from engine.kv_manager import cdiv
from engine.scheduler import ScheduledRequest, SchedulerOutput

CPU = torch.device("cpu")


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the hidden states that are sampled
    sampled: list[ScheduledRequest]  # the N requests those rows belong to


class _Tokens:
    """Accumulates the flattened tokens and their cache slots."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.blocks: list[int] = []
        self.offsets: list[int] = []
        self.logits_idx: list[int] = []
        self.sampled: list[ScheduledRequest] = []

    def add(self, s: ScheduledRequest) -> None:
        tokens = s.request.all_token_ids
        for p in range(s.start, s.start + s.num_new_tokens):
            self.ids.append(tokens[p])
            self.pos.append(p)
            self.blocks.append(s.block_ids[p // self.bs])
            self.offsets.append(p % self.bs)
        if s.samples:
            self.logits_idx.append(len(self.ids) - 1)
            self.sampled.append(s)


def build_batch(
    out: SchedulerOutput,
    block_size: int,
    window: int | None,
    device: torch.device,
    kernel: ModuleType | None = None,
) -> StepBatch:
    """Decodes first (one group for the paged ``kernel``, else grouped by length), then
    one span per prefill, as attention expects."""
    toks = _Tokens(block_size)
    if kernel is not None:
        decodes = (
            [_kernel_group(toks, out.decodes, block_size, window, device, kernel)]
            if out.decodes
            else []
        )
    else:
        groups = decode_groups(out.decodes, block_size)
        decodes = [_decode_group(toks, g, block_size, window, device) for g in groups]
    prefills = [_prefill_span(toks, s, block_size, window, device) for s in out.prefills]

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    attn = AttentionMetadata(long(toks.blocks), long(toks.offsets), decodes, prefills)
    return StepBatch(long(toks.ids), long(toks.pos), attn, long(toks.logits_idx), toks.sampled)


def _decode_group(
    toks: _Tokens,
    members: list[ScheduledRequest],
    bs: int,
    window: int | None,
    device: torch.device,
) -> DecodeGroup:
    first = len(toks.ids)
    for s in members:
        toks.add(s)
    width = cdiv(members[-1].start + 1, bs)
    tables = _block_tables(members, width)
    q_pos = torch.tensor([s.start for s in members])
    mask = allowed_keys(q_pos, width * bs, window, CPU)[:, None, None, :]
    return DecodeGroup(first, len(toks.ids), tables.to(device), mask.to(device))


def _block_tables(members: list[ScheduledRequest], width: int) -> torch.Tensor:
    """``[len(members), width]`` block ids, each row padded with block 0."""
    return torch.tensor([(s.block_ids[:width] + [0] * width)[:width] for s in members])


def _kernel_group(
    toks: _Tokens,
    members: list[ScheduledRequest],
    bs: int,
    window: int | None,
    device: torch.device,
    kernel: ModuleType,
) -> DecodeGroup:
    first = len(toks.ids)
    for s in members:
        toks.add(s)
    tables = _block_tables(members, max(cdiv(s.start + 1, bs) for s in members))
    positions = torch.tensor([s.start for s in members])
    return DecodeGroup(
        first,
        len(toks.ids),
        tables.to(device),
        positions=positions.to(device),
        window=window or 0,
        kernel=kernel,
    )


def _prefill_span(
    toks: _Tokens, s: ScheduledRequest, bs: int, window: int | None, device: torch.device
) -> PrefillSpan:
    first = len(toks.ids)
    toks.add(s)
    n_keys = s.start + s.num_new_tokens
    mask = None
    if s.start > 0 or (window is not None and n_keys > window):
        mask = allowed_keys(torch.arange(s.start, n_keys), n_keys, window, CPU)[None, None].to(
            device
        )
    table = torch.tensor(s.block_ids[: cdiv(n_keys, bs)], device=device)
    return PrefillSpan(first, len(toks.ids), s.start, table, mask)


def decode_groups(decodes: list[ScheduledRequest], block_size: int) -> list[list[ScheduledRequest]]:
    """Decodes sorted by length, cut where a group's longest would exceed twice its shortest.

    Each group is one padded attention call; grouping keeps padding under 2x while the
    number of calls stays logarithmic in the spread of lengths.
    """
    groups: list[list[ScheduledRequest]] = []
    for s in sorted(decodes, key=lambda s: s.start):
        blocks = cdiv(s.start + 1, block_size)
        if groups and blocks <= 2 * cdiv(groups[-1][0].start + 1, block_size):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups
