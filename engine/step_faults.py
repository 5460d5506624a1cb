"""What the engine loop does when ``LLMEngine.step()`` raises something unforeseen.

A step touches every running request, so its failure leaves their state half-advanced
(progress counted, no token appended). Recovery, in the engine-loop thread:

1. blame: the request being processed when it raised (the innermost frame of the
   traceback holding exactly one live request: ``sample``'s or ``step``'s loop
   variable, a ``Request`` method's ``self``); None when no single one was;
2. the blamed request fails alone (aborted, its caller gets the error). Every other
   running request is preempted: its blocks are freed and it recomputes from its tokens
   so far, as after any preemption, so its answer stays what it would have been (a
   seeded sampled request may draw differently: the failed step consumed randomness);
3. with no one to blame, every running request fails (their state cannot be trusted)
   and the waiting ones go on;
4. the block pool's integrity is checked: if the failure broke it, the loop stops.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.llm_engine import LLMEngine
from engine.request import Request


def blame(error: BaseException, live: Iterable[Request]) -> Request | None:
    """The one live request ``error`` was raised while processing, or None."""
    live_ids = {id(r) for r in live}
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first
        found = {
            id(v): v
            for v in frame.f_locals.values()
            if isinstance(v, Request) and id(v) in live_ids
        }
        if len(found) == 1:
            return next(iter(found.values()))
        if found:  # several requests in hand: no telling which
            return None
    return None


def recover(engine: LLMEngine, culprit: Request | None) -> None:
    """Undo a failed step: abort ``culprit`` and preempt the rest (or, with no culprit,
    abort every running request); then check the block pool (raises if it is broken)."""
    sched = engine.scheduler
    if culprit is not None:
        engine.abort_request(culprit.request_id)
        for req in reversed(list(sched.running)):  # preempt puts each at the queue's head
            sched.running.remove(req)
            sched._preempt(req)  # the scheduler's own preemption: free blocks, recompute
    else:
        for req in list(sched.running):
            engine.abort_request(req.request_id)
    engine.kv.check_integrity()
