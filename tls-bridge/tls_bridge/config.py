"""tls-bridge's TOML configuration: which credentials to use for which server.

The kernel names a server by IP address and port; each ``[[servers]]`` entry
maps one such pair to a CA, a client certificate and key, and a token file.
``parse_config`` checks the structure, ``load_config`` also checks that the
files are readable, so a broken deployment fails at start with one line
naming the key.  Relative paths are relative to the config file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netblk.addresses import host_port
from netblk.ktls import CIPHERS
from netblk.protocol.constants import DEFAULT_PORT, MAX_TOKEN, MIN_TOKEN
from netblk.tomlconf import ConfigError, Table, log_settings, read_toml

DEFAULT_MAX_CONCURRENT = 16
#: More parallel handshakes than this is a typo, not a deployment.
MAX_CONCURRENT_LIMIT = 1024
HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ServerEntry:
    """How to reach one storaged: whom to trust and which credentials to show."""

    address: IpAddress
    port: int
    ca: Path
    cert: Path
    key: Path
    token_file: Path
    #: Name the server certificate must carry; None means its IP address.
    server_name: str | None = None
    ciphersuites: tuple[str, ...] = tuple(CIPHERS)

    @property
    def verify_name(self) -> str:
        return self.server_name or str(self.address)

    @property
    def label(self) -> str:
        return host_port(str(self.address), self.port)


@dataclass(frozen=True)
class BridgeConfig:
    servers: Mapping[tuple[IpAddress, int], ServerEntry]
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    log_format: str = "json"
    log_level: str = "INFO"

    def server_for(self, address: str, port: int) -> ServerEntry | None:
        """The entry for a peer as the kernel reports it (an IP literal)."""
        try:
            ip = canonical_ip(ipaddress.ip_address(address))
        except ValueError:
            return None
        return self.servers.get((ip, port))


def canonical_ip(ip: IpAddress) -> IpAddress:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) is the IPv4 address it maps."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def read_token(path: Path) -> bytes:
    """The login token in ``path``, without its trailing newline.

    Raises OSError or ValueError; messages never contain the token.
    """
    token = path.read_bytes().removesuffix(b"\n").removesuffix(b"\r")
    if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
        raise ValueError(f"{path}: token must be {MIN_TOKEN}..{MAX_TOKEN} bytes, not {len(token)}")
    return token


def load_config(path: Path) -> BridgeConfig:
    config = parse_config(read_toml(path), path.parent)
    for index, server in enumerate(config.servers.values()):
        check_files(server, f"servers[{index}]")
    return config


def check_files(server: ServerEntry, where: str) -> None:
    for key in ("ca", "cert", "key"):
        file: Path = getattr(server, key)
        if not os.access(file, os.R_OK):
            raise ConfigError(f"{where}.{key}: cannot read {file}")
    try:
        read_token(server.token_file)
    except OSError as exc:
        raise ConfigError(
            f"{where}.token_file: cannot read {exc.filename}: {exc.strerror}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{where}.token_file: {exc}") from None


def parse_config(data: Mapping[str, Any], base: Path) -> BridgeConfig:
    """Validate the parsed TOML; relative paths are taken relative to ``base``."""
    root = Table(dict(data), "config")
    log = Table(root.get("log", dict, {}), "log")
    bridge = Table(root.get("bridge", dict, {}), "bridge")
    entries = root.get("servers", list, [])
    root.finish()

    log_format, log_level = log_settings(log)
    log.finish()

    max_concurrent = bridge.get("max_concurrent", int, DEFAULT_MAX_CONCURRENT)
    if not 0 < max_concurrent <= MAX_CONCURRENT_LIMIT:
        raise ConfigError(f"bridge.max_concurrent: must be 1..{MAX_CONCURRENT_LIMIT}")
    bridge.finish()

    if not entries:
        raise ConfigError("servers: at least one [[servers]] entry is required")
    servers: dict[tuple[IpAddress, int], ServerEntry] = {}
    for index, entry in enumerate(entries):
        server = _parse_server(Table(entry, f"servers[{index}]"), base)
        key = (server.address, server.port)
        if key in servers:
            raise ConfigError(f"servers[{index}]: {server.label} is configured twice")
        servers[key] = server
    return BridgeConfig(servers, max_concurrent, log_format, log_level)


def _parse_server(table: Table, base: Path) -> ServerEntry:
    where = table.where
    raw_address = table.require("address", str)
    try:
        address = canonical_ip(ipaddress.ip_address(raw_address))
    except ValueError:
        # The kernel reports the peer as an IP literal, so a name can't match.
        raise ConfigError(f"{where}.address: expected an IP address, got {raw_address!r}") from None
    port = table.get("port", int, DEFAULT_PORT)
    if not 0 < port < 1 << 16:
        raise ConfigError(f"{where}.port: must be 1..65535, got {port}")
    server_name = table.get("server_name", str)
    if server_name is not None and not _valid_server_name(server_name):
        raise ConfigError(f"{where}.server_name: not a host name or IP address: {server_name!r}")
    suites = table.get("ciphersuites", list, list(CIPHERS))
    unknown = [suite for suite in suites if not isinstance(suite, str) or suite not in CIPHERS]
    if unknown or not suites:
        raise ConfigError(
            f"{where}.ciphersuites: choose from {', '.join(CIPHERS)}; got {unknown or 'none'}"
        )
    ca, cert, key, token_file = (
        base / table.require(name, str) for name in ("ca", "cert", "key", "token_file")
    )
    table.finish()
    return ServerEntry(address, port, ca, cert, key, token_file, server_name, tuple(suites))


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _valid_server_name(name: str) -> bool:
    return is_ip_literal(name) or (len(name) <= 253 and HOSTNAME_RE.fullmatch(name) is not None)
