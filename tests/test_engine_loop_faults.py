"""One request fails alone: ``AsyncEngine`` on a real tiny ``LLMEngine``, with failures
injected the way a request could cause them (parameters whose processing raises in the
engine thread, a cache salt no key can encode), and one no request explains (the model
runner raising). The loop must go on serving; its block pool must stay whole."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import MAX_STEP_FAILURES, AsyncEngine, EngineDeadError
from engine.config import EngineConfig
from engine.errors import RequestFailedError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
TIMEOUT = 60  # seconds; a request the loop forgot would otherwise hang the test


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


class ExplodingParams(SamplingParams):
    """Parameters whose sampling raises inside ``engine.step()`` (the sampler reads
    ``greedy`` per request), like any unforeseen bad value would."""

    __slots__ = ()

    @property
    def greedy(self) -> bool:
        raise ValueError("injected sampling failure")


@pytest.fixture
def engine():
    eng = AsyncEngine(LLMEngine(EngineConfig(model="tiny", kv_cache_memory="2MiB")))
    eng.start()
    yield eng
    eng.close()


async def _answer(eng: AsyncEngine, ids: list[int], params: SamplingParams, **kw) -> list[int]:
    last = None
    async for last in eng.generate(ids, params, **kw):  # noqa: B007
        pass
    assert last is not None and last.finished
    return last.token_ids


def _prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + j) % 200 for j in range(20 + 9 * i)] for i in range(n)]


def _idle_and_whole(eng: AsyncEngine) -> None:
    kv = eng.engine.kv
    assert not eng.engine.has_unfinished() and eng.engine.requests == {}
    assert kv.pool.num_free_blocks == kv.num_blocks
    kv.check_integrity()


def test_a_request_that_fails_in_a_step_fails_alone(engine):
    prompts = _prompts(3)

    async def scenario():
        alone = [await _answer(engine, p, GREEDY) for p in prompts]
        bad = ExplodingParams(temperature=0.5, max_tokens=8)
        results = await asyncio.gather(
            *(_answer(engine, p, GREEDY) for p in prompts),
            _answer(engine, prompts[0], bad),
            return_exceptions=True,
        )
        after = await _answer(engine, prompts[1], GREEDY)
        return alone, results, after

    alone, results, after = run(scenario())
    assert isinstance(results[3], RequestFailedError) and "injected" in str(results[3])
    assert results[:3] == alone  # the others were preempted and recomputed: same answers
    assert after == alone[1] and engine.alive
    _idle_and_whole(engine)


def test_a_request_that_fails_on_admission_fails_alone(engine):
    ids = _prompts(1)[0]  # >= one full block: the salt enters the first block's hash

    async def scenario():
        with pytest.raises(RequestFailedError, match="UnicodeEncodeError"):
            await _answer(engine, ids, GREEDY, cache_salt="\ud800")  # no UTF-8 for the key
        return await _answer(engine, ids, GREEDY)

    assert len(run(scenario())) == 8 and engine.alive
    _idle_and_whole(engine)


def test_a_step_failure_no_request_explains_fails_that_step_and_the_loop_goes_on(engine):
    runner = engine.engine.runner
    execute, failures = runner.execute, []

    def failing_execute(out):  # a hook on the real runner: fails while failures are queued
        if failures:
            raise failures.pop()
        return execute(out)

    runner.execute = failing_execute
    prompts = _prompts(2)

    async def scenario():
        failures.append(RuntimeError("injected device error"))
        first = await asyncio.gather(
            *(_answer(engine, p, GREEDY) for p in prompts), return_exceptions=True
        )
        ok = await _answer(engine, prompts[0], GREEDY)
        alive_after_first = engine.alive
        failures.extend(RuntimeError("device lost") for _ in range(MAX_STEP_FAILURES))
        results = []
        for p in prompts * MAX_STEP_FAILURES:
            try:
                results.append(await _answer(engine, p, GREEDY))
            except (RequestFailedError, EngineDeadError) as e:
                results.append(e)
        return first, ok, alive_after_first, results

    first, ok, alive_after_first, results = run(scenario())
    # The requests of the failed step fail (both, unless the engine thread took the
    # second add only after that step); any other one answers in full.
    assert any(isinstance(r, RequestFailedError) for r in first), first
    assert all(isinstance(r, RequestFailedError) or len(r) == 8 for r in first), first
    assert len(ok) == 8 and alive_after_first
    # every step fails, whoever runs: the engine itself is broken and the loop stops
    kinds = [type(r) for r in results]
    assert kinds == [RequestFailedError] * (MAX_STEP_FAILURES - 1) + [EngineDeadError] * (
        len(results) - MAX_STEP_FAILURES + 1
    ), kinds
    assert not engine.alive


def test_a_failing_after_step_hook_does_not_stop_the_loop():
    calls = []

    def hook():
        calls.append(1)
        raise OSError("publisher gone")

    eng = AsyncEngine(LLMEngine(EngineConfig(model="tiny", kv_cache_memory="2MiB")), hook)
    eng.start()
    try:
        out = run(_answer(eng, _prompts(1)[0], GREEDY))
        # 8 steps; the hook of the last may still be running when the answer arrives
        assert len(out) == 8 and len(calls) >= 7 and eng.alive
    finally:
        eng.close()
