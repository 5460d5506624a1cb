"""Token selection: greedy, or temperature / top-k / top-p with a per-request generator."""

from __future__ import annotations

import torch

from engine.request import Request


def sample(
    logits: torch.Tensor, requests: list[Request], default_generator: torch.Generator
) -> tuple[list[int], list[float | None]]:
    """Pick one token per row of ``logits`` [N, vocab] (float32) for ``requests[i]``.

    Logprobs, where asked for, are of the chosen token under the model's raw distribution.
    """
    tokens = logits.argmax(dim=-1).tolist()  # greedy for everyone; sampled rows overwrite
    for i in range(len(requests)):  # by index: no request stays bound here after its row
        token = _sample_row(logits[i], requests[i], default_generator)
        if token is not None:
            tokens[i] = token
    logprobs: list[float | None] = [None] * len(requests)
    want = [i for i, r in enumerate(requests) if r.params.logprobs]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        for j, i in enumerate(want):
            logprobs[i] = float(lp[j, tokens[i]])
    return tokens, logprobs


def _sample_row(row: torch.Tensor, req: Request, default: torch.Generator) -> int | None:
    """``req``'s token from its ``row`` of logits [vocab], or None when it is greedy.

    Its own frame: a failure here names ``req`` alone (engine/step_faults.py blames the
    one request a failing frame holds)."""
    p = req.params
    if p.greedy:
        return None
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        row = _top_p_filter(row, p.top_p)
    probs = torch.softmax(row, dim=-1)
    gen = req.generator if req.generator is not None else default
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _top_p_filter(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``top_p``."""
    sorted_logits, order = torch.sort(row, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    sorted_logits[mass_before >= top_p] = float("-inf")
    return torch.empty_like(row).scatter_(0, order, sorted_logits)
