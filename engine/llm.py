"""The offline API: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    """Generate text or token ids with a model (a preset name or a checkpoint directory).

    Keyword arguments are :class:`EngineConfig` fields (``max_num_seqs``,
    ``kv_cache_memory``, ``enable_prefix_caching``, ...).
    """

    def __init__(self, model: str = "tiny", **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def close(self) -> None:
        """Finish pending KV saves (a ``kv_connector``'s store) and release them."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | None = None,
        kv_transfer_params: dict | Sequence[dict | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; one output per prompt, in order.

        ``kv_transfer_params`` (one for all prompts, or one per prompt): disaggregated
        prefill/decode legs as ``engine serve`` takes them (connector/disagg.py). A
        prefill leg's output carries its ``kv_transfer_params`` once its KV is durable
        and leased; those hand-offs finish on a worker thread while the engine keeps
        stepping the other prompts."""
        batch = _as_batch(prompts)
        param_list = _per_prompt(
            params or SamplingParams(), SamplingParams, batch, "sampling params"
        )
        kv_list = _per_prompt(kv_transfer_params, dict, batch, "kv_transfer_params")
        for p in batch:  # validate everything before admitting anything
            self.engine.tokenize(p)
        reqs = [
            self.engine.add_request(p, sp, cache_salt=cache_salt, kv_transfer_params=kv)
            for p, sp, kv in zip(batch, param_list, kv_list, strict=True)
        ]
        done: dict[str, RequestOutput | Future] = {}
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-handoff") as handoffs:
            while len(done) < len(reqs):
                for out in self.engine.step():
                    if not out.finished:
                        continue
                    if out.kv_transfer_pending is not None:
                        done[out.request_id] = handoffs.submit(self.engine.finish_kv_transfer, out)
                    else:
                        done[out.request_id] = out
            outs = [done[r.request_id] for r in reqs]
            return [o.result() if isinstance(o, Future) else o for o in outs]


def _per_prompt(value: Any, single: type, batch: list, what: str) -> list:
    """``value`` for every prompt: the same one, or a sequence of one per prompt."""
    if value is None or isinstance(value, single):
        return [value] * len(batch)
    values = list(value)
    if len(values) != len(batch):
        raise InvalidRequestError(f"got {len(batch)} prompts but {len(values)} {what}")
    return values


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidRequestError("no prompts given")
    if all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts
