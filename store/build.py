"""Backends from a StoreConfig: the one place that maps tier settings to constructors."""

from __future__ import annotations

import logging

from backends.base import Backend, BackendUnavailable, create_backend
from store.config import StoreConfig

log = logging.getLogger(__name__)


def build_backend(name: str, config: StoreConfig) -> Backend:
    """The backend of tier ``name`` as configured; may raise BackendUnavailable."""
    t = config.tier(name)
    if name == "cpu":
        return create_backend(
            name, capacity=t.size, page_size=t.page_size, policy=t.policy, shared=t.shared
        )
    if name == "gpu":
        return create_backend(name, capacity=t.size, page_size=t.page_size, policy=t.policy)
    if name in ("disk", "gds"):
        return create_backend(
            name,
            path=t.path,
            capacity=t.size,
            policy=t.policy,
            fsync=t.fsync,
            o_direct=t.o_direct,
            open_files=t.open_files,
        )
    if name == "remote":
        return create_backend(
            "remote",
            url=t.url,
            token_file=t.token_file,
            timeout=t.timeout,
            connect_timeout=t.connect_timeout,
            retry_after=t.retry_after,
            transport=t.transport,
        )
    return create_backend(
        "redis",
        url=t.url,
        namespace=t.namespace,
        ttl=t.ttl,
        connect_timeout=t.connect_timeout,
        timeout=t.timeout,
        retry_after=t.retry_after,
        batch_size=t.batch_size,
    )


def build_tiers(config: StoreConfig) -> dict[str, Backend]:
    """Every configured tier, fastest first. A ``gds`` tier that cannot run here (no GPU
    or no kvikio) is served by a ``disk`` backend on its directory (or left out when a
    disk tier is configured anyway), with a warning."""
    tiers: dict[str, Backend] = {}
    for name in config.tiers:
        try:
            tiers[name] = build_backend(name, config)
        except BackendUnavailable as exc:
            if name != "gds":
                for built in tiers.values():
                    built.close()
                raise
            if "disk" in config.tiers:
                log.warning("%s; skipping tier 'gds', the disk tier serves", exc)
                continue
            log.warning("%s; the disk backend serves tier 'gds' at %s", exc, config.gds.path)
            g = config.gds
            tiers[name] = create_backend(
                "disk",
                path=g.path,
                capacity=g.size,
                policy=g.policy,
                fsync=g.fsync,
                open_files=g.open_files,
            )
    return tiers
