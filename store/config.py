"""Store configuration: one table of keys, read from defaults < YAML < KVSTORE_* env < CLI.

Keys are dotted (``cpu.size``); the environment variable of a key is ``KVSTORE_`` plus
the key upper-cased with dots as underscores (``KVSTORE_CPU_SIZE``). Sizes take units
(``8GiB``, ``512MiB``, ``64KiB``, ``1GB``, or plain bytes). docs/store.md has the table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from store.config_load import ConfigError, coerce, flatten, parse_size, read_yaml
from store.wire.constants import DEFAULT_URL, TRANSPORTS

__all__ = ["ConfigError", "StoreConfig", "parse_size"]

TIERS = ("gpu", "cpu", "disk", "gds", "redis", "remote")
REMOTE_TRANSPORTS = TRANSPORTS  # the client's bulk paths (store/wire/constants.py)
WRITE_POLICIES = ("write_through", "write_back")
EVICTION_POLICIES = ("s3fifo", "lru")
MAX_LEASE_TTL = 600.0  # seconds: the ceiling of max_lease_ttl; a lease is a hand-off, not storage


def _size(default: str) -> Any:
    return field(default=parse_size(default), metadata={"size": True})


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _check_positive(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}: must be a positive number, got {value!r}")


@dataclass(slots=True)
class TierConfig:
    """Settings every tier has. ``write_policy`` None inherits the store's."""

    write_policy: str | None = None
    verify: bool = True  # check key, fingerprint and checksum of every read

    def validate(self, name: str) -> None:
        if self.write_policy is not None:
            _check_choice(f"{name}.write_policy", self.write_policy, WRITE_POLICIES)


@dataclass(slots=True)
class PoolConfig(TierConfig):
    """A memory tier (cpu, gpu): a preallocated pool of pages."""

    size: int = _size("4GiB")
    page_size: int = _size("64KiB")
    policy: str = "s3fifo"
    verify: bool = False  # memory this process owns: checked when it leaves, not on reads
    shared: bool = False  # cpu only: a pool same-host clients map read-only (the daemon's)

    def validate(self, name: str) -> None:
        TierConfig.validate(self, name)
        _check_choice(f"{name}.policy", self.policy, EVICTION_POLICIES)
        if self.shared and name != "cpu":
            raise ConfigError(f"{name}.shared: only the cpu tier's pool can be shared")
        if self.page_size > self.size:
            raise ConfigError(
                f"{name}.page_size ({self.page_size}) exceeds {name}.size ({self.size})"
            )


@dataclass(slots=True)
class DiskConfig(TierConfig):
    """A directory of chunk files (disk, gds)."""

    path: str = "/var/tmp/kvstore"
    size: int = _size("64GiB")
    policy: str = "s3fifo"
    fsync: bool = True
    o_direct: bool = False
    open_files: int = 1024  # read descriptors kept open between gets (0: none)

    def validate(self, name: str) -> None:
        TierConfig.validate(self, name)
        _check_choice(f"{name}.policy", self.policy, EVICTION_POLICIES)
        if not isinstance(self.open_files, int) or self.open_files < 0:
            raise ConfigError(f"{name}.open_files: must be a whole number >= 0")
        if not self.path:
            raise ConfigError(f"{name}.path: must name a directory")


@dataclass(slots=True)
class RedisConfig(TierConfig):
    """A Redis/Valkey server or cluster."""

    url: str = "redis://localhost:6379/0"
    namespace: str = "kvstore:"
    ttl: float | None = None  # seconds; None keeps chunks until the server evicts them
    connect_timeout: float = 1.0
    timeout: float = 5.0
    retry_after: float = 5.0
    batch_size: int = 64

    def validate(self, name: str) -> None:
        TierConfig.validate(self, name)
        from backends.redis import parse_url

        try:
            parse_url(self.url)
        except ValueError as exc:
            raise ConfigError(f"{name}.url: {exc}") from None
        for key in ("connect_timeout", "timeout", "retry_after", "batch_size"):
            _check_positive(f"{name}.{key}", getattr(self, key))
        if self.ttl is not None:
            _check_positive(f"{name}.ttl", self.ttl)


@dataclass(slots=True)
class RemoteConfig(TierConfig):
    """A kvstore daemon (``kvstore serve``); ``kvstore://host:port`` in ``tiers`` sets ``url``."""

    url: str = DEFAULT_URL
    token_file: str | None = None  # file holding the daemon's bearer token
    transport: str = "auto"  # auto (shm on the same host, else stream), shm, stream, grpc, ucx
    timeout: float = 5.0
    connect_timeout: float = 1.0
    retry_after: float = 1.0  # first back-off after an error; doubles up to 30 s

    def validate(self, name: str) -> None:
        TierConfig.validate(self, name)
        from store.client import parse_url

        try:
            parse_url(self.url)
        except ValueError as exc:
            raise ConfigError(f"{name}.url: {exc}") from None
        _check_choice(f"{name}.transport", self.transport, REMOTE_TRANSPORTS)
        for key in ("timeout", "connect_timeout", "retry_after"):
            _check_positive(f"{name}.{key}", getattr(self, key))


@dataclass(slots=True)
class StoreConfig:
    """The whole store. Tiers are listed fastest first."""

    tiers: list[str] = field(default_factory=lambda: ["cpu"])
    chunk_size: int = 256  # tokens per chunk, a multiple of the engine's block size
    write_policy: str = "write_through"
    workers: int = 4  # executor threads for async loads, prefetches and saves
    io_threads: int = 4  # threads one large batched get/put is split across (1: no split)
    save_nice: int = 10  # niceness of the thread running async saves (0: the caller's)
    # Disaggregated prefill/decode leases (docs/server.md, "Limits"): what a daemon lets
    # leases pin, and what an engine lets a request's kv_transfer_params ask for.
    max_lease_ttl: float = 60.0  # longest lease a daemon grants and an engine asks for (s)
    max_leases_per_client: int = 256  # daemon: leases one client may hold at once
    # daemon: bytes one client's leases / all leases may pin (None: 1/4 / 1/2 of tier one)
    max_lease_bytes_per_client: int | None = field(default=None, metadata={"size": True})
    max_lease_bytes: int | None = field(default=None, metadata={"size": True})
    allowed_remote_stores: list[str] = field(default_factory=list)  # engine: besides its own
    max_outstanding_leases: int = 1024  # engine: unexpired leases it holds; past it, no hand-off
    gpu: PoolConfig = field(default_factory=lambda: PoolConfig(size=parse_size("1GiB")))
    cpu: PoolConfig = field(default_factory=PoolConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    gds: DiskConfig = field(default_factory=lambda: DiskConfig(path="/var/tmp/kvstore-gds"))
    redis: RedisConfig = field(default_factory=RedisConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tiers, str):
            self.tiers = [t.strip() for t in self.tiers.split(",") if t.strip()]
        for i, t in enumerate(self.tiers):
            if isinstance(t, str) and t.startswith("kvstore://"):  # a daemon named by its url
                self.remote.url, self.tiers[i] = t, "remote"
        if not self.tiers:
            raise ConfigError(f"tiers: list at least one of {', '.join(TIERS)}")
        for t in self.tiers:
            _check_choice("tiers", t, TIERS)
        if len(set(self.tiers)) != len(self.tiers):
            raise ConfigError(f"tiers: {self.tiers} lists a tier twice")
        _check_choice("write_policy", self.write_policy, WRITE_POLICIES)
        for key in ("chunk_size", "workers", "io_threads"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.save_nice, int) or not 0 <= self.save_nice <= 19:
            raise ConfigError(f"save_nice: must be an integer 0-19, got {self.save_nice!r}")
        self._check_leases()
        for name in TIERS:
            getattr(self, name).validate(name)

    def _check_leases(self) -> None:
        _check_positive("max_lease_ttl", self.max_lease_ttl)
        if self.max_lease_ttl > MAX_LEASE_TTL:
            raise ConfigError(
                f"max_lease_ttl: at most {MAX_LEASE_TTL:g} seconds, got {self.max_lease_ttl!r}"
            )
        for key in ("max_leases_per_client", "max_outstanding_leases"):
            n = getattr(self, key)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"{key}: must be a positive integer, got {n!r}")
        for key in ("max_lease_bytes_per_client", "max_lease_bytes"):  # None: from the tier
            if getattr(self, key) is not None:
                setattr(self, key, parse_size(getattr(self, key), key))
        from store.client import parse_url

        if isinstance(self.allowed_remote_stores, str):
            self.allowed_remote_stores = [
                u.strip() for u in self.allowed_remote_stores.split(",") if u.strip()
            ]
        for url in self.allowed_remote_stores:
            try:
                parse_url(url)
            except (ValueError, AttributeError):
                raise ConfigError(
                    f"allowed_remote_stores: {url!r} is not a kvstore://host:port url"
                ) from None

    def tier(self, name: str) -> TierConfig:
        return getattr(self, name)

    def write_policy_of(self, name: str) -> str:
        return self.tier(name).write_policy or self.write_policy

    @classmethod
    def load(
        cls,
        path: str | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> StoreConfig:
        """Defaults, then the YAML file at ``path``, then ``KVSTORE_*`` env, then ``overrides``."""
        values: dict[str, Any] = {}
        if path:
            values.update(flatten(read_yaml(path)))
        env = os.environ if env is None else env
        for key in all_keys():
            var = env_var(key)
            if var in env:
                values[key] = env[var]
        values.update(overrides or {})
        return from_flat(values)


def env_var(key: str) -> str:
    """``cpu.size`` -> ``KVSTORE_CPU_SIZE``."""
    return "KVSTORE_" + key.upper().replace(".", "_")


def all_keys() -> list[str]:
    """Every dotted key of the table, in order."""
    keys = []
    for f in fields(StoreConfig):
        if f.name in TIERS:
            keys += [f"{f.name}.{sub.name}" for sub in fields(_tier_type(f.name))]
        else:
            keys.append(f.name)
    return keys


def _tier_type(name: str) -> type:
    return {
        "gpu": PoolConfig,
        "cpu": PoolConfig,
        "disk": DiskConfig,
        "gds": DiskConfig,
        "redis": RedisConfig,
        "remote": RemoteConfig,
    }[name]


def from_flat(values: Mapping[str, Any]) -> StoreConfig:
    """Build a config from dotted keys (values typed or strings); unknown keys are errors."""
    known = set(all_keys())
    top: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {t: {} for t in TIERS}
    for key, raw in values.items():
        if key not in known:
            raise ConfigError(f"{key}: unknown key; known keys: {', '.join(sorted(known))}")
        tier, _, name = key.partition(".")
        if name:
            f = next(f for f in fields(_tier_type(tier)) if f.name == name)
            sub[tier][name] = coerce(key, raw, f)
        else:
            f = next(f for f in fields(StoreConfig) if f.name == key)
            top[key] = coerce(key, raw, f)
    for t in TIERS:
        base = _default_tier(t)
        for name, value in sub[t].items():
            setattr(base, name, value)
        top[t] = base
    return StoreConfig(**top)


def _default_tier(name: str) -> TierConfig:
    f = next(f for f in fields(StoreConfig) if f.name == name)
    return f.default_factory()  # type: ignore[misc]


def resolve_store_config(kv_config: Any) -> StoreConfig:
    """A ``StoreConfig`` from a YAML path, a (nested or dotted) mapping, a StoreConfig or
    ``None`` (defaults). ``KVSTORE_*`` environment variables apply to paths, mappings and
    None, as for the daemon."""
    if isinstance(kv_config, StoreConfig):
        return kv_config
    if kv_config is None:
        return StoreConfig.load()
    if isinstance(kv_config, (str, Path)):
        return StoreConfig.load(str(kv_config))
    if isinstance(kv_config, Mapping):
        return StoreConfig.load(overrides=flatten(dict(kv_config)))
    raise TypeError(
        f"kv_config must be a store YAML path, a mapping or a StoreConfig, got {type(kv_config).__name__}"
    )
