"""Router configuration, checked once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.policies import POLICY_NAMES
from router.prompt import DEFAULT_PREFIX_TOKENS

DEFAULT_MAX_BODY_BYTES = 16 << 20


@dataclass(slots=True)
class RouterConfig:
    """``backends`` (plain mode) or ``prefill`` + ``decode`` (P/D mode), never both.

    ``kv_events`` are ZMQ endpoints, one per instance in the order given (backends, or
    prefill then decode), each ``PUB[,REPLAY]``, or ``URL=PUB[,REPLAY]`` to name the instance.

    ``api_key``: what clients must send as ``Authorization: Bearer`` (None: no check).
    ``backend_api_key``: what the router sends its backends (None: no Authorization);
    a client's own header is never passed on. ``max_body_bytes``: larger request bodies
    are a 413. ``route_prefix_tokens``: how many leading prompt tokens are hashed for
    prefix-aware routing (``router/prompt.py``).
    """

    backends: list[str] = field(default_factory=list)
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    policy: str = "round_robin"
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    backend_api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    route_prefix_tokens: int = DEFAULT_PREFIX_TOKENS
    block_size: int = 16
    tokenizer: str | None = None
    kv_events: list[str] = field(default_factory=list)
    kv_topic: str = ""
    health_interval: float = 2.0
    health_timeout: float = 2.0
    connect_timeout: float = 3.0
    request_timeout: float = 600.0
    load_alpha: float = 32.0
    load_cap: int = 4

    def __post_init__(self) -> None:
        if self.backends and (self.prefill or self.decode):
            raise ValueError("give either --backend or --prefill/--decode, not both")
        if self.prefill and not self.decode:
            raise ValueError("--prefill needs at least one --decode")
        if not self.backends and not self.decode:
            raise ValueError(
                "no backends: give --backend URL ... or --prefill URL ... --decode URL ..."
            )
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose {', '.join(POLICY_NAMES)}")
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        for name in ("health_interval", "health_timeout", "connect_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0")
        if self.load_alpha < 0 or self.load_cap < 0:
            raise ValueError("load alpha and load cap must be >= 0")
        for name, key in (("API key", self.api_key), ("backend API key", self.backend_api_key)):
            _check_key(name, key)
        if self.max_body_bytes < 1024:
            raise ValueError(f"max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.route_prefix_tokens < self.block_size:
            raise ValueError(
                f"route-prefix-tokens must be >= the block size ({self.block_size}), "
                f"got {self.route_prefix_tokens}"
            )
        self.kv_event_sources()  # raises on an endpoint that names no known backend

    def kv_event_sources(self) -> list[tuple[str, str, str | None]]:
        """``(backend URL, PUB endpoint, replay endpoint or None)`` per ``kv_events`` entry."""
        from router.backends import normalize_url
        from router.kv_subscriber import parse_endpoint

        known = [normalize_url(u) for u in self.instances]
        out = []
        for i, spec in enumerate(self.kv_events):
            url, pub, replay = parse_endpoint(spec, known[i] if i < len(known) else None)
            if normalize_url(url) not in known:
                raise ValueError(f"--kv-events {spec!r}: {url} is not a backend")
            out.append((normalize_url(url), pub, replay))
        return out

    @property
    def disaggregated(self) -> bool:
        return bool(self.decode)

    @property
    def instances(self) -> list[str]:
        """Every backend URL in the order ``kv_events`` endpoints are matched to."""
        return [*self.backends, *self.prefill, *self.decode]


def _check_key(name: str, key: str | None) -> None:
    """A key goes in an HTTP header: printable ASCII, no spaces."""
    if key is None:
        return
    if not key:
        raise ValueError(f"the {name} is empty")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise ValueError(f"the {name} must be printable ASCII without spaces")
