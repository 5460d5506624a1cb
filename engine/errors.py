"""Errors the engine raises for bad input; the CLI and HTTP layers turn them into messages."""


class EngineError(Exception):
    """Base class of the engine's user-facing errors (one clear line of text)."""


class InvalidRequestError(EngineError, ValueError):
    """A request or its sampling parameters are invalid (empty prompt, max_tokens < 1, ...)."""


class ModelLoadError(EngineError):
    """A model name or checkpoint cannot be loaded (unknown preset, missing or broken files)."""


class KVLoadError(EngineError):
    """Loading a request's KV from the connector failed under ``kv_load_failure_policy="fail"``."""


class RequestFailedError(EngineError):
    """The engine failed one request unexpectedly (a bug, or an input no check foresaw).

    Only that request fails; the engine goes on serving the others."""
