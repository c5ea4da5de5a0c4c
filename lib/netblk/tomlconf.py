"""Reading TOML config files the one way storaged, tls-bridge and the admin
API share: errors name the full key, wrong types and unknown keys are
refused, and the ``[log]`` table means the same everywhere.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

LOG_FORMATS = ("json", "text")


class ConfigError(Exception):
    """The config cannot be used; the message names the key and why."""


def read_toml(path: Path) -> dict[str, Any]:
    """Parse ``path``; unreadable files and bad TOML are ConfigErrors."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


class Table:
    """A TOML table that reports typos and wrong types by full key name.

    ``where`` is the table's own key ("" for the root, whose keys are then
    named bare); every key read is remembered so ``finish`` can refuse the
    rest as unknown.
    """

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table")
        self.data: Mapping[str, Any] = data
        self.where = where
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            wanted = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.key(name)}: expected {wanted}, got {value!r}")
        return value

    def require(self, name: str, kind: type) -> Any:
        if name not in self.data:
            raise ConfigError(f"{self.key(name)}: required")
        return self.get(name, kind)

    def table(self, name: str) -> Table:
        return Table(self.get(name, dict, {}), self.key(name))

    def positive(self, name: str, default: float, kind: type = int) -> Any:
        value = self.get(name, (int, float) if kind is float else int, default)
        if value <= 0:
            raise ConfigError(f"{self.key(name)}: must be positive, got {value!r}")
        return kind(value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown setting")


def log_settings(log: Table, levels: Collection[str] | None = None) -> tuple[str, str]:
    """``[log] format`` and ``level`` (upper-cased); ``levels`` narrows the
    accepted levels, which are otherwise every level ``logging`` knows."""
    log_format = log.get("format", str, "json")
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"{log.key('format')}: expected 'json' or 'text', got {log_format!r}")
    log_level = log.get("level", str, "INFO").upper()
    if levels is not None:
        known = log_level in levels
    else:
        known = isinstance(logging.getLevelName(log_level), int)
    if not known:
        raise ConfigError(f"{log.key('level')}: unknown level {log_level!r}")
    return log_format, log_level
