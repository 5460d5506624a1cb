"""The step loop: admit requests, schedule, run the model, sample, stop."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, KVLoadError
from engine.kv_manager import KVCacheManager
from engine.loader import ModelSource, open_model
from engine.outputs import RequestMetrics, RequestOutput
from engine.request import Request
from engine.runner import ModelRunner
from engine.sampler import sample
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

if TYPE_CHECKING:
    from connector.base import KVConnectorBase
    from kvcore.events import KVCacheEvent

Prompt = str | Sequence[int]
LOOKUP_POLL = 0.002
"""Seconds a step that could schedule nothing sleeps while requests wait for the
connector's store lookups (instead of spinning the engine loop until they answer)."""


class LLMEngine:
    """One model, one KV cache, one scheduler; ``step()`` advances every running request."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = open_model(config.model)
        self.model_name = source.name
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.runner = ModelRunner(config, source)
        self.kv = KVCacheManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.connector = self._make_connector(source)
        if self.connector is not None:
            self.runner.attach_connector(self.connector)
        sched_cfg = SchedulerConfig(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
            config.enable_kv_events,
        )
        self.scheduler = Scheduler(sched_cfg, self.kv, self.connector)
        self.eos_token_ids = frozenset(source.config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator().manual_seed(config.seed)
        self._ids = itertools.count()

    def _make_connector(self, source: ModelSource) -> KVConnectorBase | None:
        """The configured KV connector bound to this model, or None for ``none``."""
        if self.config.kv_connector == "none":
            return None
        from connector.base import ConnectorContext, create_connector
        from engine.fingerprint import model_fingerprint

        mc, r = source.config, self.runner
        ctx = ConnectorContext(
            model_fingerprint(source, r.dtype),
            self.config.block_size,
            mc.num_layers,
            mc.num_kv_heads,
            mc.head_dim,
            r.dtype,
            r.device,
            self.config.kv_config,
            self.config.kv_load_failure_policy,
            self.config.kv_load_timeout,
            self.config.enable_kv_events,
            self.config.kv_save_decoded,
            self.config.kv_role,
        )
        try:
            return create_connector(self.config.kv_connector, ctx)
        except (ValueError, TypeError) as e:  # the store's ConfigError is a ValueError
            raise InvalidRequestError(f"kv connector {self.config.kv_connector}: {e}") from None

    def close(self) -> None:
        """Finish the connector's pending saves and release its store. Idempotent."""
        if self.connector is not None:
            self.connector.shutdown()
            self.connector = None
            self.scheduler.connector = None
            self.runner.connector = None
            self.runner.before_layer = self.runner.after_layer = None

    def take_kv_events(self) -> list[KVCacheEvent]:
        """KV events since the last call (``enable_kv_events``): the engine cache's and the
        connector's, in ``kvcore.events`` types."""
        return self.scheduler.take_kv_events()

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt`` (text or ids), checked against the vocabulary and context."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError(
                    f"model {self.model_name} has no tokenizer.json; pass token ids instead of text"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the vocabulary [0, {vocab})"
            )
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; the context is {self.max_model_len} tokens "
                "and at least one must be left to generate"
            )
        return ids

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        kv_transfer_params: dict | None = None,
    ) -> Request:
        """Queue a request. ``kv_transfer_params`` (vLLM's disaggregated-serving field,
        ``connector/disagg.py``): ``do_remote_decode`` on a prefill leg,
        ``do_remote_prefill`` with the prefill node's answer on a decode leg."""
        if kv_transfer_params is not None:
            from connector.disagg import check_params

            # With the connector's policy: its allow-list of stores, its max lease TTL.
            policy = self.connector.handoff_policy if self.connector is not None else None
            why = check_params(kv_transfer_params, policy)
            if why is not None:
                raise InvalidRequestError(why)
        ids = self.tokenize(prompt)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        req = Request(
            rid,
            ids,
            params or SamplingParams(),
            self.config.block_size,
            cache_salt or None,
            kv_transfer_params=kv_transfer_params,
        )
        self.requests[rid] = req
        self.scheduler.add_request(req)
        return req

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; outputs of the requests that got a token this step."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            if out.awaiting_lookup:
                time.sleep(LOOKUP_POLL)
            return []
        logits, sampled = self.runner.execute(out)
        ok = set(self.scheduler.update(out))
        if len(ok) < len(sampled):  # failed KV loads: those rows read wrong KV, drop them
            rows = [i for i, s in enumerate(sampled) if s.request in ok]
            logits, sampled = logits[rows], [sampled[i] for i in rows]
        sampling = [s.request for s in sampled]
        tokens, logprobs = sample(logits, sampling, self.generator)
        outputs = []
        for req, tok, lp in zip(sampling, tokens, logprobs, strict=True):
            req.append_output(tok, lp)
            reason = self._stop_reason(req)
            if reason is not None:
                self.scheduler.finish(req, reason)
                self.requests.pop(req.request_id, None)
            outputs.append(self.make_output(req))
        if out.load_failed and self.config.kv_load_failure_policy == "fail":
            self._fail_loads(out.load_failed)
        return outputs

    def _fail_loads(self, failed: list[Request]) -> None:
        """``kv_load_failure_policy="fail"``: abort the requests and say why."""
        why = self.connector.load_error(failed[0].request_id) if self.connector else None
        for req in failed:
            self.abort_request(req.request_id)
        ids = ", ".join(r.request_id for r in failed)
        raise KVLoadError(
            f"loading KV for request(s) {ids} failed ({why or 'unknown error'}); "
            "kv_load_failure_policy is 'fail' (use 'recompute' to recompute instead)"
        )

    def _stop_reason(self, req: Request) -> str | None:
        tok, p = req.output_token_ids[-1], req.params
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(req.output_token_ids)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                req.stop_text_len = min(hits)
                return "stop"
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def make_output(self, req: Request) -> RequestOutput:
        ids = req.output_token_ids
        text = ""
        if self.tokenizer is not None:
            shown = ids
            if req.finish_reason == "stop" and req.stop_text_len is None:
                shown = ids[:-1]  # the eos / stop token itself is not text
            text = self.tokenizer.decode(shown)
            if req.stop_text_len is not None:
                text = text[: req.stop_text_len]
        finished = req.finish_reason is not None
        metrics = RequestMetrics(
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            finished_time=time.perf_counter() if finished else None,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_cached_tokens=max(req.num_cached_tokens, 0),
            num_preemptions=req.num_preemptions,
            kv_sources=dict(req.kv_sources) or {"engine": max(req.num_cached_tokens, 0)},
        )
        pending = req.kv_transfer_pending if finished else None
        return RequestOutput(
            req.request_id,
            list(req.prompt_token_ids),
            list(ids),
            text,
            req.finish_reason,
            list(req.output_logprobs) if req.params.logprobs else None,
            metrics,
            kv_transfer_pending=pending,
        )

    def finish_kv_transfer(self, output: RequestOutput) -> RequestOutput:
        """Complete a finished prefill leg's KV hand-off (wait for its saves, lease them)
        and set ``output.kv_transfer_params``. Blocking, bounded by ``kv_load_timeout``;
        safe to call from another thread than the one stepping the engine."""
        pending, output.kv_transfer_pending = output.kv_transfer_pending, None
        connector = self.connector
        if pending is not None and connector is not None:
            output.kv_transfer_params = connector.finish_remote_decode(pending)
        return output
