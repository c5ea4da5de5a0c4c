"""The admin API's TOML configuration, parsed into frozen dataclasses.

Every error names the offending key.  Relative paths are relative to the
config file.  admin-api/README.md documents every key;
admin-api/examples/admin-api.toml is a commented example.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import extract_parameters
from argon2.exceptions import InvalidHashError

from netblk.protocol.names import validate_name
from netblk.tokens import HASH_PREFIX
from netblk.tomlconf import ConfigError, Table, log_settings, read_toml

DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_PORT = 10920
DEFAULT_SYSFS_ROOT = Path("/sys/block")


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


def load_config(path: Path) -> ApiConfig:
    """Read and validate ``path``; the TLS files, if any, must be readable."""
    config = parse_config(read_toml(path), path.parent)
    if config.tls is not None:
        for key in ("cert", "key"):
            tls_file: Path = getattr(config.tls, key)
            if not os.access(tls_file, os.R_OK):
                raise ConfigError(f"tls.{key}: cannot read {tls_file}")
    return config


def parse_config(data: Mapping[str, Any], base: Path) -> ApiConfig:
    """Validate the parsed TOML; relative paths are taken relative to ``base``."""
    root = Table(dict(data), "config")
    api = Table(root.get("api", dict, {}), "api")
    log = Table(root.get("log", dict, {}), "log")
    tls_data = root.get("tls", dict)
    tokens = _parse_tokens(Table(root.get("tokens", dict, {}), "tokens"))
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
        table = Table(tls_data, "tls")
        tls = TlsFiles(base / table.require("cert", str), base / table.require("key", str))
        table.finish()

    log_format, log_level = log_settings(log)
    log.finish()
    return ApiConfig(tokens, listen, port, sysfs_root, tls, log_format, log_level)


def _parse_tokens(table: Table) -> dict[str, str]:
    tokens = {}
    for name in table.data:
        try:
            validate_name(name, "token name")
        except ValueError as exc:
            raise ConfigError(f"tokens.{name}: {exc}") from None
        entry = Table(table.get(name, dict), f"tokens.{name}")
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
