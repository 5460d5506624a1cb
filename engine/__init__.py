"""kvstore's inference engine: paged KV, prefix caching, continuous batching."""

from engine.errors import EngineError, InvalidRequestError, ModelLoadError
from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "EngineError",
    "InvalidRequestError",
    "ModelLoadError",
]
