"""Backends the router sends requests to, and what it knows about each: health and load."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

ROLES = ("both", "prefill", "decode")


@dataclass(slots=True, eq=False)
class Backend:
    """One engine instance, named by its base URL (also its name in the KV index).

    ``in_flight`` is counted by the router itself (requests it sent and has not seen
    finish); ``scraped_load`` is ``running + waiting`` read from the backend's own
    ``/metrics`` when it exports them, so load from other clients counts too.
    """

    url: str
    role: str = "both"
    healthy: bool = True
    in_flight: int = 0
    scraped_load: int = 0

    @property
    def load(self) -> int:
        return max(self.in_flight, self.scraped_load)


@dataclass(slots=True)
class BackendPool:
    """All backends, in the order given on the command line."""

    backends: list[Backend] = field(default_factory=list)

    @classmethod
    def of(cls, urls: Iterable[str], role: str = "both") -> BackendPool:
        return cls([Backend(normalize_url(u), role) for u in urls])

    def add(self, urls: Iterable[str], role: str) -> None:
        self.backends += [Backend(normalize_url(u), role) for u in urls]

    def with_role(self, role: str) -> list[Backend]:
        return [b for b in self.backends if b.role == role]

    def healthy(self, role: str, exclude: set[str] = frozenset()) -> list[Backend]:
        """Healthy backends of ``role`` not in ``exclude`` (URLs)."""
        return [b for b in self.with_role(role) if b.healthy and b.url not in exclude]

    def by_url(self, url: str) -> Backend | None:
        url = normalize_url(url)
        return next((b for b in self.backends if b.url == url), None)


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url
