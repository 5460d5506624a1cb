"""Router configuration, checked once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.policies import POLICY_NAMES


@dataclass(slots=True)
class RouterConfig:
    """``backends`` (plain mode) or ``prefill`` + ``decode`` (P/D mode), never both.

    ``kv_events`` are ZMQ endpoints, one per instance in the order given (backends, or
    prefill then decode), each ``PUB[,REPLAY]``, or ``URL=PUB[,REPLAY]`` to name the instance.
    """

    backends: list[str] = field(default_factory=list)
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    policy: str = "round_robin"
    host: str = "127.0.0.1"
    port: int = 8080
    auth_token: str | None = None
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
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("the auth token is empty")
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
