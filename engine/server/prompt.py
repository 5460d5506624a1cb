"""A checked request -> prompt token ids and the ``max_tokens`` that fits beside them.

Text is measured before it is tokenized (a prompt past ``ServerConfig.max_prompt_chars``
cannot fit the context, whatever its tokens), then rendered (chat) and tokenized in a
small thread pool: a long prompt never stalls the event loop, which keeps answering
``/health`` and streaming other requests' tokens meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import Executor

from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.server.chat import ChatTemplate
from engine.server.protocol import ApiError, GenerationRequest


async def prompt_ids(
    engine: LLMEngine,
    req: GenerationRequest,
    template: ChatTemplate,
    max_chars: int,
    pool: Executor,
) -> list[int]:
    """Prompt token ids of ``req``, checked against the vocabulary and the context."""
    if req.messages is not None:
        _check_chars(sum(len(m["content"]) for m in req.messages), max_chars, "messages")
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(pool, template.render, req.messages)
        return await _tokenize(engine, text, "messages", max_chars, pool)
    assert req.prompt is not None
    return await _tokenize(engine, req.prompt, "prompt", max_chars, pool)


async def _tokenize(
    engine: LLMEngine, prompt: str | list[int], param: str, max_chars: int, pool: Executor
) -> list[int]:
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise ApiError(
                f"model {engine.model_name} has no tokenizer; send token ids", param, "no_tokenizer"
            )
        _check_chars(len(prompt), max_chars, param)
        try:
            prompt = await asyncio.get_running_loop().run_in_executor(
                pool, engine.tokenizer.encode, prompt
            )
        except InvalidRequestError as e:
            raise ApiError(str(e), param, "invalid_value") from None
    if len(prompt) >= engine.max_model_len:
        raise ApiError(
            f"this model's context is {engine.max_model_len} tokens and the prompt has "
            f"{len(prompt)}; at least one token must be left to generate",
            param,
            "context_length_exceeded",
        )
    try:
        return engine.tokenize(prompt)  # token ids: the vocabulary check, O(len)
    except InvalidRequestError as e:
        raise ApiError(str(e), param, "invalid_value") from None


def _check_chars(n: int, max_chars: int, param: str) -> None:
    if n > max_chars:
        raise ApiError(
            f"the prompt has {n} characters; this server takes at most {max_chars} "
            "(max_model_len x --max-chars-per-token), more than its context can hold",
            param,
            "context_length_exceeded",
        )


def fit_max_tokens(
    req: GenerationRequest, num_prompt: int, max_model_len: int
) -> GenerationRequest:
    """``req`` with ``max_tokens`` within the room the prompt leaves: a value the client
    set that does not fit is a 400 (as vLLM answers); the default is cut to fit."""
    room = max_model_len - num_prompt
    asked = req.params.max_tokens
    if asked <= room:
        return req
    if req.max_tokens_param is not None:
        raise ApiError(
            f"'{req.max_tokens_param}' is too large: {asked}. This model's maximum context "
            f"length is {max_model_len} tokens and your request has {num_prompt} input tokens "
            f"({asked} > {max_model_len} - {num_prompt})",
            req.max_tokens_param,
            "context_length_exceeded",
        )
    return dataclasses.replace(req, params=dataclasses.replace(req.params, max_tokens=room))
