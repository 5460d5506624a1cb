"""A stopped kvstore daemon stalls only the requests whose store lookup waits on it.

The engine's only tier is a real ``kvstore serve`` process that the tests freeze with
SIGSTOP (its sockets still accept; nothing answers). A request whose prompt has chunks
to look up waits for its lookup, off the engine loop, until the lookup's deadline
(``kv_load_timeout``) and then recomputes; meanwhile the running requests keep
decoding and a request with nothing to look up is scheduled at once. Assertions are
on step order, not on wall-clock margins; the deadline test checks only that the wait
is not shorter than the deadline and far from the RPC's own 10 s.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest
from connector_cases import CHUNK, checkpoint, greedy, prompts, reference, tiered_llm
from daemon_proc import start_daemon

from engine import SamplingParams
from engine.request import RequestStatus

DEADLINE = 1.0  # kv_load_timeout: how long a request waits for its lookup
LOADABLE = 4 * CHUNK  # chunks of a 150-token prompt that a load may serve


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = checkpoint(tmp_path_factory.mktemp("ckpt"))
    a, b = prompts(seed=21)
    d, _ = prompts(seed=22)
    short = a[-20:]  # under one chunk: nothing to look up
    daemon = start_daemon("--cpu-size", "16MiB")
    try:
        yield model, daemon, (a, b, d, short), reference(model, [a, b, d, short])
    finally:
        daemon.kill()


def remote_config(daemon, **extra) -> dict:
    cfg = {"tiers": [daemon.url], "chunk_size": CHUNK, "remote.retry_after": 0.2}
    cfg.update(extra)
    return cfg


@contextmanager
def frozen(daemon):
    """The daemon stopped by SIGSTOP, and continued even when the test fails."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


def step_until(engine, done, limit: float = 20) -> list:
    """Step ``engine`` until ``done()``; every output, in order."""
    outs, deadline = [], time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "the engine made no progress"
        outs += engine.step()
    return outs


def test_a_stopped_daemon_stalls_only_the_requests_that_look_it_up(case):
    model, daemon, (a, b, _, short), (ref_a, ref_b, _, ref_short) = case
    # Deadlines far away: a can only go on once the daemon answers, whatever the load.
    cfg = remote_config(daemon, **{"remote.timeout": 60.0})
    with tiered_llm(model, cfg, kv_load_timeout=60.0) as llm:
        eng = llm.engine
        first = llm.generate([a], greedy())[0]  # a's chunks are now in the daemon
        eng.connector.flush()
        assert first.token_ids == ref_a and first.metrics.kv_sources == {"engine": 0}

        # b runs (its lookup answered: a miss) and decodes on for a while.
        long_b = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        rb = eng.add_request(b, long_b, request_id="b")
        step_until(eng, lambda: rb.output_token_ids)
        with frozen(daemon):
            ra = eng.add_request(a, greedy(), request_id="a")
            rs = eng.add_request(short, greedy(), request_id="short")
            eng.step()
            # short (no chunk to look up) is scheduled at once, behind a in the queue;
            # b decodes on.
            assert len(rs.output_token_ids) == 1 and len(rb.output_token_ids) == 2
            assert not ra.output_token_ids and ra.status is RequestStatus.WAITING
            step_until(eng, lambda: rb.is_finished and rs.is_finished)
            assert not ra.output_token_ids  # b and short finished while a waited
        # Continued: a's lookup is answered, and a loads its chunks from the daemon.
        outs = step_until(eng, lambda: ra.is_finished)
        out_a = next(o for o in outs if o.request_id == "a" and o.finished)
        assert out_a.token_ids == ref_a
        assert out_a.metrics.kv_sources == {"engine": 0, "remote": LOADABLE}
        assert rb.output_token_ids[:6] == ref_b and rs.output_token_ids == ref_short
        assert not eng.connector._requests  # nothing kept for finished requests


def test_a_lookup_is_waited_for_until_its_deadline_then_recomputes(case):
    model, daemon, (a, *_), (ref_a, *_) = case
    # The RPC's own deadline (10 s) is far past the lookup's: the connector stops waiting.
    cfg = remote_config(daemon, **{"remote.timeout": 10.0})
    with tiered_llm(model, cfg, kv_load_timeout=DEADLINE) as llm:
        eng = llm.engine
        llm.generate([a], greedy())  # connected; a's chunks are in the daemon already
        with frozen(daemon):
            ra = eng.add_request(a, greedy(), request_id="a")
            added = time.perf_counter()  # the clock of first_token_time
            outs = step_until(eng, lambda: ra.is_finished)
            waited = ra.first_token_time - added
        assert ra.output_token_ids == ref_a  # recomputed: the same greedy answer
        assert next(o for o in outs if o.finished).metrics.kv_sources == {"engine": 0}
        assert waited >= DEADLINE * 0.9, f"a gave up its lookup early ({waited:.2f}s)"
        assert waited < 8.0, f"a waited {waited:.2f}s: past the lookup's deadline"
        again = llm.generate([a], greedy())[0]  # continued: hits again
        assert again.token_ids == ref_a
        assert again.metrics.kv_sources == {"engine": 0, "remote": LOADABLE}


def test_a_lookup_in_back_off_is_answered_at_once_and_an_abort_drops_its_lookup(case):
    model, daemon, (a, _, d, _), (ref_a, _, ref_d, _) = case
    # A short RPC deadline: the frozen daemon fails the lookup, and the remote tier
    # then stays away (back-off) for 30 s.
    cfg = remote_config(
        daemon, **{"remote.timeout": 0.5, "remote.connect_timeout": 0.5, "remote.retry_after": 30.0}
    )
    with tiered_llm(model, cfg, kv_load_timeout=5.0) as llm:
        eng = llm.engine
        with frozen(daemon):
            gone = eng.add_request(a, greedy(), request_id="gone")
            assert eng.step() == [] and gone.status is RequestStatus.WAITING  # looking it up
            assert eng.abort_request("gone") and not eng.has_unfinished()
            assert not eng.connector._requests

            ra = eng.add_request(a, greedy(), request_id="a")
            outs = step_until(eng, lambda: ra.is_finished)
            assert ra.output_token_ids == ref_a  # the lookup failed at 0.5 s: recomputed
            assert next(o for o in outs if o.finished).metrics.kv_sources == {"engine": 0}
            assert not eng.connector.store.tiers[0].backend.available()  # backing off

            # In back-off the answer is immediate: d runs in the step it was added in.
            rd = eng.add_request(d, greedy(), request_id="d")
            eng.step()
            assert len(rd.output_token_ids) == 1
            step_until(eng, lambda: rd.is_finished)
            assert rd.output_token_ids == ref_d
