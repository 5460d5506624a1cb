"""Who may do what at the daemon: bearer tokens, their scopes, their cache-salt binding.

A presented token resolves to a ``Grant`` (``Authenticator.grant``), the same way for a
gRPC call (``authorization: Bearer <token>``) and a stream connection (``hello``):

* **scope** ``write`` may do everything; ``read`` may Lookup, Get, Stats, Health and
  Release (a decode node ends the lease its prefill node took), never Put, Delete or
  Lease (PERMISSION_DENIED; nothing is stored).
* **salt binding**: a token given a ``cache_salt`` sees only keys tagged with that
  salt (``kvcore.keys.salt_tag``; a salted request's chunk keys are ``<tag>.<hex>``).
  Its writes must name only such keys (else PERMISSION_DENIED, nothing stored); its
  Lookup stops at the first key of another tag and its Get misses those keys, so it
  never learns whether another tenant's key is stored. It may not read the daemon-wide
  Stats, and is never handed the same-host door (a mapping of the whole shared pool).

With no token configured every caller gets ``OPEN`` (write, unbound); the daemon then
listens on loopback only, unless started with ``--insecure`` (``ServeOptions``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from kvcore.keys import salt_tag
from store.config import ConfigError

READ, WRITE = "read", "write"
SCOPES = (READ, WRITE)
WRITE_OPS = frozenset({"Put", "Delete", "Lease"})
"""Operations that change what is stored or pinned (gRPC method names; stream ops
capitalised)."""
GLOBAL_OPS = frozenset({"Stats"})
"""Operations that report on every tenant's traffic at once."""


class PermissionDenied(Exception):
    """An authenticated caller asked for something its token does not allow."""


class Visible(NamedTuple):
    """The keys of a read a grant may see: ``keys``, and where each stands in the
    request (``positions``; None when they are the request's keys, in order)."""

    keys: list[str]
    positions: list[int] | None
    total: int  # keys in the request

    def at(self, i: int) -> int:
        """The request position of ``keys[i]``."""
        return i if self.positions is None else self.positions[i]

    def reposition(self, rows: list[list[Any]]) -> None:
        """Make each row's first item (a position in ``keys``) the request position."""
        if self.positions is not None:
            for row in rows:
                row[0] = self.positions[row[0]]

    def done(self, handled: int) -> int:
        """Request keys answered once ``handled`` of ``keys`` are: up to the next
        visible key not handled yet (the invisible ones before it are misses)."""
        if self.positions is None:
            return handled
        return self.total if handled >= len(self.keys) else self.positions[handled]


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token allows: its ``scope`` and the salt tag it is bound to, if any."""

    scope: str = WRITE
    salt_tag: str | None = None
    holder: str | None = None  # names the token (a digest prefix), for per-client caps

    def refusal(self, op: str) -> str | None:
        """Why this grant may not run ``op`` at all, or None if it may."""
        if op in WRITE_OPS and self.scope != WRITE:
            return f"{op} needs a read-write token; this token is read-only"
        if op in GLOBAL_OPS and self.salt_tag is not None:
            return f"{op} reports on every tenant; a token bound to a cache salt may not ask"
        return None

    def check(self, op: str) -> None:
        """PermissionDenied unless this grant may run ``op``."""
        why = self.refusal(op)
        if why is not None:
            raise PermissionDenied(why)

    def check_own(self, keys: Sequence[Any], op: str) -> None:
        """PermissionDenied unless a salt-bound grant's ``keys`` all carry its tag."""
        if self.salt_tag is None:
            return
        prefix = self.salt_tag + "."
        if not all(type(k) is str and k.startswith(prefix) for k in keys):
            raise PermissionDenied(
                f"{op}: this token may touch only keys of its cache salt (tag {self.salt_tag})"
            )

    def visible(self, keys: list[str]) -> Visible:
        """The keys of a read (already checked) that this grant may see."""
        if self.salt_tag is None:
            return Visible(keys, None, len(keys))
        prefix = self.salt_tag + "."
        if all(k.startswith(prefix) for k in keys):  # a tenant's own request: as is
            return Visible(keys, None, len(keys))
        positions = [i for i, k in enumerate(keys) if k.startswith(prefix)]
        return Visible([keys[i] for i in positions], positions, len(keys))

    def leading(self, keys: list[str]) -> list[str]:
        """The leading run of ``keys`` this grant may see (a Lookup's prefix stops at
        the first key of another tenant, as if it were not stored)."""
        if self.salt_tag is None:
            return keys
        prefix = self.salt_tag + "."
        for i, k in enumerate(keys):
            if not k.startswith(prefix):
                return keys[:i]
        return keys


OPEN = Grant()
"""Every caller's grant on a daemon without tokens."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One accepted bearer token (``kvstore serve --auth-tokens`` lists them)."""

    token: str
    scope: str = WRITE
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token.strip():
            raise ConfigError("token: must be a non-empty string")
        if self.token != self.token.strip() or any(c in self.token for c in "\r\n"):
            raise ConfigError("token: must not start or end with whitespace")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope: {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not self.cache_salt
        ):
            raise ConfigError("cache_salt: must be a non-empty string (or left out)")

    def grant(self) -> Grant:
        return Grant(self.scope, salt_tag(self.cache_salt) if self.cache_salt else None)


class Authenticator:
    """Resolves presented tokens to grants. Without entries, everyone gets ``OPEN``.

    Tokens are looked up by their SHA-256 digest: one dict probe however many tenants
    have tokens, and as safe as a constant-time compare (``hmac.compare_digest``) of
    each, since the probe's timing depends only on how the digest of what the caller
    sent compares with the stored digests, which the caller cannot steer without a
    preimage of SHA-256."""

    def __init__(self, entries: Sequence[TokenEntry] = ()) -> None:
        self._grants: dict[bytes, Grant] = {}
        for e in entries:
            digest = _digest(e.token.encode())
            if digest in self._grants:
                raise ConfigError("tokens: the same token is listed twice")
            # Per-client caps (leases) count by token: a name a caller could choose is
            # no identity. The name is a digest prefix, safe to log.
            self._grants[digest] = replace(e.grant(), holder=f"token-{digest[:4].hex()}")

    @property
    def required(self) -> bool:
        """Whether callers must present a token."""
        return bool(self._grants)

    def grant(self, token: str | bytes | None) -> Grant | None:
        """The grant of ``token``; None when tokens are required and it is none of them."""
        if not self._grants:
            return OPEN
        raw = token.encode() if isinstance(token, str) else bytes(token or b"")
        return self._grants.get(_digest(raw))

    def grant_of_metadata(self, metadata: Any) -> Grant | None:
        """The grant of a gRPC call's ``authorization: Bearer <token>`` metadata."""
        if not self._grants:
            return OPEN
        value = dict(metadata or ()).get("authorization", "")
        value = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if not value.startswith("Bearer "):
            return None
        return self.grant(value[len("Bearer ") :])


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(b"kvstore-token\0" + token).digest()


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def load_tokens(path: str) -> list[TokenEntry]:
    """The entries of the YAML file at ``path`` (``kvstore serve --auth-tokens``)::

        tokens:
          - token_file: /run/secrets/engines      # or token: "..." (a file is safer)
            scope: write                          # read | write (default write)
          - token_file: /run/secrets/tenant-a
            cache_salt: tenant-a-salt             # may touch only this salt's keys

    A relative ``token_file`` is relative to the YAML file's directory."""
    from store.config_load import read_yaml

    data = read_yaml(path)
    items = data.get("tokens")
    if set(data) != {"tokens"} or not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected 'tokens:' with a list of at least one entry")
    return [_entry(path, f"tokens[{i}]", item) for i, item in enumerate(items)]


def _entry(path: str, where: str, item: Any) -> TokenEntry:
    if not isinstance(item, dict):
        raise ConfigError(f"{path}: {where}: expected a mapping (token_file, scope, cache_salt)")
    unknown = set(item) - {"token", "token_file", "scope", "cache_salt"}
    if unknown:
        raise ConfigError(
            f"{path}: {where}: unknown key {sorted(unknown)[0]!r} "
            "(known: token, token_file, scope, cache_salt)"
        )
    if ("token" in item) == ("token_file" in item):
        raise ConfigError(f"{path}: {where}: give exactly one of token, token_file")
    token = item.get("token")
    if "token_file" in item:
        token = _read_token_file(path, where, item["token_file"])
    salt = item.get("cache_salt")
    try:
        return TokenEntry(token, item.get("scope", WRITE), None if salt is None else salt)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {where}.{exc}") from None


def _read_token_file(path: str, where: str, name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: {where}.token_file: must name a file")
    full = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    try:
        with open(full) as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: {where}.token_file: {exc.strerror}: {full}") from None
    if not token:
        raise ConfigError(f"{path}: {where}.token_file: {full} is empty")
    return token
