"""Reading config values: YAML files, nesting to dotted keys, strings to typed values."""

from __future__ import annotations

import re
from dataclasses import Field
from typing import Any

import yaml

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from ``8GiB`` / ``64KiB`` / ``1GB`` / ``4096`` / an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"{key}: {value!r} is not a size (examples: 4096, 64KiB, 512MiB, 8GiB)"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"{key}: size must be positive, got {value!r}")
    return n


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in the YAML file at ``path``."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)  # PyYAML's message spans lines: one here
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"config file {path}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of keys")
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"cpu": {"size": "1GiB"}}`` -> ``{"cpu.size": "1GiB"}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def coerce(key: str, raw: Any, f: Field) -> Any:
    """``raw`` (typed, or a string from env/CLI) as the type of field ``f``."""
    if f.metadata.get("size"):
        return parse_size(raw, key)
    kind = str(f.type)
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        if "None" in kind:
            return None
        raise ConfigError(f"{key}: a value is required")
    if kind.startswith("list"):
        if isinstance(raw, str):
            return [t.strip() for t in raw.split(",") if t.strip()]
        if isinstance(raw, (list, tuple)):
            return [str(t) for t in raw]
        raise ConfigError(f"{key}: expected a list (YAML list or comma-separated), got {raw!r}")
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in _TRUE | _FALSE:
            return str(raw).lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")
    if kind == "int":
        return _number(key, raw, int)
    if kind.startswith("float"):
        return _number(key, raw, float)
    if isinstance(raw, (dict, list)):
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    return str(raw)


def _number(key: str, raw: Any, kind: type) -> Any:
    if isinstance(raw, bool):
        raise ConfigError(f"{key}: expected a number, got {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}: expected {'an integer' if kind is int else 'a number'}, got {raw!r}"
        ) from None
