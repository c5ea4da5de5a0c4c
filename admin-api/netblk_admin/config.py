"""The admin API's TOML configuration, parsed into frozen dataclasses.

Every error names the offending key.  Relative paths are relative to the
config file.  admin-api/README.md documents every key;
admin-api/examples/admin-api.toml is a commented example.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import extract_parameters
from argon2.exceptions import InvalidHashError

from netblk_certs.tokens import HASH_PREFIX
from storaged.protocol.names import validate_name

DEFAULT_CONFIG = Path("/etc/netblk/admin-api.toml")
DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_PORT = 10920
DEFAULT_SYSFS_ROOT = Path("/sys/block")
LOG_FORMATS = ("json", "text")


class ConfigError(Exception):
    """The configuration is unusable; the message names the key and why."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ApiConfig:
    #: Bearer tokens by name (the name shows in the log, never the token):
    #: each value is the argon2id PHC hash ``netblk-certs token`` prints.
    tokens: Mapping[str, str]
    listen: str = DEFAULT_LISTEN
    port: int = DEFAULT_PORT
    sysfs_root: Path = DEFAULT_SYSFS_ROOT
    #: None serves plain HTTP (fine on loopback, the default address).
    tls: TlsFiles | None = None
    log_format: str = "json"
    log_level: str = "INFO"

    @property
    def loopback_only(self) -> bool:
        return ipaddress.ip_address(self.listen).is_loopback


class _Table:
    """One TOML table; reports wrong types and unknown keys by full name."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.used: set[str] = set()

    def get(self, name: str, kind: type, default: Any = None) -> Any:
        self.used.add(name)
        value = self.data.get(name, default)
        if value is not default and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(f"{self.where}.{name}: expected {kind.__name__}, got {value!r}")
        return value

    def require(self, name: str, kind: type) -> Any:
        if name not in self.data:
            raise ConfigError(f"{self.where}.{name}: required")
        return self.get(name, kind)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}.{unknown[0]}: unknown setting")


def load_config(path: Path) -> ApiConfig:
    """Read and validate ``path``; the TLS files, if any, must be readable."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    config = parse_config(data, path.parent)
    if config.tls is not None:
        for key in ("cert", "key"):
            tls_file: Path = getattr(config.tls, key)
            if not os.access(tls_file, os.R_OK):
                raise ConfigError(f"tls.{key}: cannot read {tls_file}")
    return config


def parse_config(data: Mapping[str, Any], base: Path) -> ApiConfig:
    """Validate the parsed TOML; relative paths are taken relative to ``base``."""
    root = _Table(dict(data), "config")
    api = _Table(root.get("api", dict, {}), "api")
    log = _Table(root.get("log", dict, {}), "log")
    tls_data = root.get("tls", dict)
    tokens = _parse_tokens(_Table(root.get("tokens", dict, {}), "tokens"))
    root.finish()

    listen = api.get("listen", str, DEFAULT_LISTEN)
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        raise ConfigError(f"api.listen: expected an IP address, got {listen!r}") from None
    port = api.get("port", int, DEFAULT_PORT)
    if not 0 < port < 1 << 16:
        raise ConfigError(f"api.port: must be 1..65535, got {port}")
    sysfs_root = base / api.get("sysfs_root", str, str(DEFAULT_SYSFS_ROOT))
    api.finish()

    tls = None
    if tls_data is not None:
        table = _Table(tls_data, "tls")
        tls = TlsFiles(base / table.require("cert", str), base / table.require("key", str))
        table.finish()

    log_format = log.get("format", str, "json")
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"log.format: expected 'json' or 'text', got {log_format!r}")
    log_level = log.get("level", str, "INFO").upper()
    if not isinstance(logging.getLevelName(log_level), int):
        raise ConfigError(f"log.level: unknown level {log_level!r}")
    log.finish()
    return ApiConfig(tokens, listen, port, sysfs_root, tls, log_format, log_level)


def _parse_tokens(table: _Table) -> dict[str, str]:
    tokens = {}
    for name in table.data:
        try:
            validate_name(name, "token name")
        except ValueError as exc:
            raise ConfigError(f"tokens.{name}: {exc}") from None
        entry = _Table(table.get(name, dict), f"tokens.{name}")
        token_hash = entry.require("token_hash", str)
        entry.finish()
        # A hash that can never match would lock its holder out silently.
        if not _is_argon2id(token_hash):
            raise ConfigError(
                f"tokens.{name}.token_hash: expected an argon2id hash (netblk-certs token)"
            )
        tokens[name] = token_hash
    if not tokens:
        raise ConfigError("tokens: at least one [tokens.NAME] with a token_hash is required")
    return tokens


def _is_argon2id(token_hash: str) -> bool:
    try:
        extract_parameters(token_hash)
    except InvalidHashError:
        return False
    return token_hash.startswith(HASH_PREFIX)
