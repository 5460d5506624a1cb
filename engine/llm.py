"""The offline API: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence

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
    ) -> list[RequestOutput]:
        """Run every prompt to completion; one output per prompt, in order."""
        batch = _as_batch(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(batch)
        else:
            param_list = list(params)
            if len(param_list) != len(batch):
                raise InvalidRequestError(
                    f"got {len(batch)} prompts but {len(param_list)} sampling params"
                )
        for p in batch:  # validate everything before admitting anything
            self.engine.tokenize(p)
        reqs = [self.engine.add_request(p, sp, cache_salt=cache_salt) for p, sp in zip(batch, param_list, strict=True)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(reqs):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r.request_id] for r in reqs]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidRequestError("no prompts given")
    if all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts
