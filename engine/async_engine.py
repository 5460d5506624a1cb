"""An asyncio front end over the synchronous ``LLMEngine``: one thread steps the engine.

The engine is not thread-safe, so exactly one thread (the engine loop) touches it:

    asyncio side                      engine-loop thread
    generate() --("add", ...)-->      engine.add_request()
    abort()    --("abort", rid)-->    engine.abort_request()
                                      engine.step() -> outputs
    asyncio.Queue per request  <----  loop.call_soon_threadsafe(queue.put_nowait, output)

Commands travel over one thread-safe FIFO, so an abort is always handled after the add
it follows. A consumer that stops reading early (a client that disconnected) closes its
``generate()`` iterator, which aborts the request and frees its blocks.

One request fails alone: an add or a step that raises fails the request it was about
(``RequestFailedError``) and the loop goes on (``engine/step_faults.py``). Only what no
request explains ends the loop: a broken block pool, ``MAX_STEP_FAILURES`` steps in a row
failing with no one to blame (a lost device, say), or an error outside add/step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import EngineError, RequestFailedError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.step_faults import blame, recover

log = logging.getLogger(__name__)
MAX_STEP_FAILURES = 3  # consecutive steps failing with no request to blame: the engine is broken


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot the engine loop publishes after each iteration (for /metrics)."""

    running: int = 0
    waiting: int = 0
    num_blocks: int = 0
    free_blocks: int = 0


class EngineDeadError(EngineError):
    """The engine loop stopped (shut down, or a step raised an unexpected error)."""


class _Stream:
    """One request's outputs, pushed from the engine thread into the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def push(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


class AsyncEngine:
    """Serve one ``LLMEngine`` to many asyncio tasks. ``start()`` before use,
    ``close()`` after (it also closes the engine: pending KV saves finish)."""

    def __init__(self, engine: LLMEngine, after_step: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._after_step = after_step  # runs in the engine-loop thread (e.g. publish KV events)
        self.stats = EngineStats(num_blocks=engine.kv.num_blocks, free_blocks=engine.kv.num_blocks)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine-loop thread only
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._unexplained_failures = 0  # consecutive failed steps no request explains

    # -- asyncio side -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine loop runs and takes requests."""
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def close(self) -> None:
        """Stop the loop (requests still running get ``EngineDeadError``), close the engine."""
        if self._thread is not None:
            self._commands.put(("stop",))
            self._thread.join()
            self._thread = None
        self.engine.close()

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        request_id: str | None = None,
        kv_transfer_params: dict | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs (each holds all tokens so far); the last one
        is finished. Closing the iterator before that aborts the request. A prefill leg's
        last output gets its ``kv_transfer_params`` once its KV is durable and leased
        (in a worker thread: the engine loop goes on stepping)."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        rid = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop())
        self._commands.put(
            ("add", rid, list(prompt_token_ids), params, cache_salt, kv_transfer_params, stream)
        )
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped the request
                    raise item
                finished = item.finished
                if finished and item.kv_transfer_pending is not None:
                    await asyncio.to_thread(self.engine.finish_kv_transfer, item)
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished); its blocks are freed."""
        self._commands.put(("abort", request_id))

    # -- engine-loop thread -----------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._handle_commands(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
                    self._run_after_step()
                self._publish_stats()
        except BaseException as e:  # noqa: BLE001 - everyone waiting must hear of it
            log.exception("engine loop failed")
            self._dead = e
        self._dead = self._dead or EngineDeadError("the engine is shut down")
        error = EngineDeadError(f"the engine loop has stopped: {self._dead}")
        for rid, stream in self._streams.items():
            self._abort(rid)
            stream.push(error)
        self._streams.clear()
        while not self._commands.empty():  # adds that raced with the stop
            cmd = self._commands.get_nowait()
            if cmd[0] == "add":
                cmd[-1].push(error)
        self._publish_stats()

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts (waiting for one when idle); False on ``stop``."""
        while True:
            try:
                cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "abort" and self._streams.pop(cmd[1], None) is not None:
                self._abort(cmd[1])

    def _add(
        self,
        rid: str,
        ids: list[int],
        params: SamplingParams,
        salt: str | None,
        kv_transfer_params: dict | None,
        stream: _Stream,
    ) -> None:
        try:
            self.engine.add_request(
                ids, params, request_id=rid, cache_salt=salt, kv_transfer_params=kv_transfer_params
            )
        except EngineError as e:
            stream.push(e)
            return
        except Exception as e:  # noqa: BLE001 - the request is at fault, not the engine
            log.exception("request %s failed on admission", rid)
            if rid in self.engine.requests:  # it got in before the failure: take it out
                self._abort(rid)
            stream.push(_failed(rid, e))
            return
        self._streams[rid] = stream

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineError as e:  # e.g. KVLoadError: the engine aborted those requests
            log.warning("engine step: %s", e)
            self._fail_dropped(e)
            return
        except Exception as e:  # noqa: BLE001 - one request's fault must not stop the rest
            self._recover(e)
            return
        self._unexplained_failures = 0
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.push(out)

    def _recover(self, error: Exception) -> None:
        """A step raised: fail the request to blame, or all running ones (see step_faults)."""
        culprit = blame(error, self.engine.requests.values())
        who = f"request {culprit.request_id}" if culprit else "no single request"
        log.error("engine step failed (%s to blame)", who, exc_info=error)
        if culprit is None:
            self._unexplained_failures += 1
            if self._unexplained_failures >= MAX_STEP_FAILURES:
                raise RuntimeError(
                    f"{MAX_STEP_FAILURES} engine steps in a row failed, "
                    f"the last with {type(error).__name__}: {error}"
                ) from error
        else:
            self._unexplained_failures = 0
            stream = self._streams.pop(culprit.request_id, None)
            if stream is not None:
                stream.push(_failed(culprit.request_id, error))
        recover(self.engine, culprit)  # raises if the block pool is broken: the loop stops
        self._fail_dropped(
            RequestFailedError(
                f"an engine step running this request failed ({type(error).__name__}: {error}); "
                "the server goes on"
            )
        )

    def _abort(self, rid: str) -> None:
        try:
            self.engine.abort_request(rid)
        except Exception:  # noqa: BLE001 - e.g. the connector's request_finished raised
            log.exception("aborting request %s failed (its blocks are freed)", rid)

    def _run_after_step(self) -> None:
        if self._after_step is None:
            return
        try:
            self._after_step()
        except Exception:  # e.g. publishing KV events; the requests are not at fault
            log.exception("after-step hook failed")

    def _fail_dropped(self, error: EngineError) -> None:
        """Tell every request the engine no longer holds that it failed with ``error``."""
        for rid in [r for r in self._streams if r not in self.engine.requests]:
            self._streams.pop(rid).push(error)

    def _publish_stats(self) -> None:
        sched, kv = self.engine.scheduler, self.engine.kv
        self.stats = EngineStats(
            len(sched.running), len(sched.waiting), kv.num_blocks, kv.pool.num_free_blocks
        )


def _failed(rid: str, error: BaseException) -> RequestFailedError:
    return RequestFailedError(
        f"request {rid} failed in the engine: {type(error).__name__}: {error}; the server goes on"
    )
