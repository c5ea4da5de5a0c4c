"""storaged's TOML configuration, parsed into frozen dataclasses.

Every error names the offending key, so an operator can fix the file
without reading code.  Relative paths are taken relative to the config file.
See docs/operations.md for a commented example.
"""

from __future__ import annotations

import enum
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netblk.protocol.constants import DEFAULT_PORT, MAX_PAYLOAD
from netblk.protocol.names import validate_client_name, validate_export_name
from netblk.tomlconf import ConfigError, Table, log_settings, read_toml

SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

DEFAULT_LISTEN = ("0.0.0.0", "::")  # noqa: S104 - a storage server; mTLS guards it
DEFAULT_MAX_INFLIGHT = 64
DEFAULT_MAX_INFLIGHT_BYTES = 32 << 20
DEFAULT_WORKERS = 8
DEFAULT_LOGIN_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_MAX_LOGIN_FAILURES = 5
DEFAULT_MAX_PENDING = 128
DEFAULT_MAX_PENDING_PER_PEER = 16
DEFAULT_MAX_CONNECTIONS = 256
#: Four devices of netblk.ko's most connections (16) each.
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 64
DEFAULT_FAILURE_WINDOW = 60.0
DEFAULT_CONTROL_SOCKET = Path("/run/netblk/storaged.sock")
DEFAULT_LEASE_INTERVAL = 1.0
DEFAULT_TAKEOVER_AFTER = 5.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Access(enum.Enum):
    """A client's rights on one export."""

    NONE = "none"
    RO = "ro"
    RW = "rw"


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path
    ca: Path
    #: Let the kernel seal records where it can (``tls.kernel_tls``).
    kernel_tls: bool = True


@dataclass(frozen=True)
class ClientConfig:
    """A client is admitted when its certificate CN is ``name`` and its
    token verifies against ``token_hash`` (argon2id)."""

    name: str
    token_hash: str


@dataclass(frozen=True)
class RbdImage:
    """A volume in a Ceph RBD image, and how to reach it (cephx)."""

    pool: str
    image: str
    conf: Path
    client: str
    keyring: Path | None = None

    def __str__(self) -> str:
        return f"rbd:{self.pool}/{self.image}"


#: Where an export's LUKS2 volume lives: a file (or block device), or an image.
Location = Path | RbdImage


@dataclass(frozen=True)
class ExportConfig:
    name: str
    volume: Location
    passphrase_file: Path | None
    passphrase_env: str | None
    access: Mapping[str, Access]
    trim: bool = True


@dataclass(frozen=True)
class LoginPolicy:
    """At most ``max_failures`` credential failures (DENIED) per peer address
    and per certificate name within ``window`` seconds; beyond that, logins
    are refused unexamined (storaged.login says what counts and why).
    ``max_pending`` and ``max_pending_per_peer`` cap the connections not
    logged in yet (storaged.admission)."""

    max_failures: int = DEFAULT_MAX_LOGIN_FAILURES
    window: float = DEFAULT_FAILURE_WINDOW
    timeout: float = DEFAULT_LOGIN_TIMEOUT
    max_pending: int = DEFAULT_MAX_PENDING
    max_pending_per_peer: int = DEFAULT_MAX_PENDING_PER_PEER


@dataclass(frozen=True)
class FailoverPolicy:
    """How instances that serve the same RBD exports hand them over
    (storaged/failover.py): the active beats its lease every
    ``lease_interval`` seconds; a standby takes over once the lease has not
    changed for ``takeover_after``.  ``instance`` names this storaged in
    the lease and the logs."""

    instance: str
    lease_interval: float = DEFAULT_LEASE_INTERVAL
    takeover_after: float = DEFAULT_TAKEOVER_AFTER


@dataclass(frozen=True)
class Config:
    tls: TlsSettings
    clients: Mapping[str, ClientConfig] = field(default_factory=dict)
    exports: Mapping[str, ExportConfig] = field(default_factory=dict)
    listen: tuple[str, ...] = DEFAULT_LISTEN
    port: int = DEFAULT_PORT
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    max_payload: int = MAX_PAYLOAD
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    workers: int = DEFAULT_WORKERS
    login: LoginPolicy = LoginPolicy()
    failover: FailoverPolicy = field(
        default_factory=lambda: FailoverPolicy(instance=default_instance(DEFAULT_PORT))
    )
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    control_socket: Path | None = DEFAULT_CONTROL_SOCKET
    log_format: str = "json"
    log_level: str = "INFO"
    #: What the operator should hear about the file at start (settings that
    #: still parse but no longer act).
    notices: tuple[str, ...] = ()


def default_instance(port: int) -> str:
    """This storaged's name unless ``failover.instance`` gives one."""
    return f"{socket.gethostname()}:{port}"


def parse_size(value: object, key: str) -> int:
    """Accept 4096, "64M", "64MiB", "1G" (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := SIZE_RE.fullmatch(value.strip())):
        return int(match[1]) * SIZE_UNITS[match[2].upper()]
    raise ConfigError(f"{key}: expected a size like 4096, '64MiB' or '1G', got {value!r}")


def load_config(path: Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a config file; ``overrides`` are CLI flags."""
    config = parse_config(read_toml(path), base=path.parent)
    return apply_overrides(config, overrides or {})


def apply_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """Apply CLI flags (``None`` means not given) over the file's values."""
    tls = config.tls
    tls = replace(
        tls,
        cert=overrides.get("tls_cert") or tls.cert,
        key=overrides.get("tls_key") or tls.key,
        ca=overrides.get("tls_ca") or tls.ca,
    )
    simple = {
        k: v
        for k, v in overrides.items()
        if v is not None and k in {"port", "listen", "control_socket", "log_format"}
    }
    return replace(config, tls=tls, **simple)


def _cache_notices(cache: Table) -> tuple[str, ...]:
    """``[cache] size`` still parses, so configs that set it keep working,
    but storaged keeps no plaintext cache any more (docs/performance.md)."""
    size = cache.get("size", (int, str))
    if size is None:
        return ()
    parse_size(size, "cache.size")
    return (
        "cache.size is ignored: storaged keeps no cache of decrypted sectors "
        "(the page cache holds the ciphertext; docs/performance.md)",
    )


def parse_config(data: Mapping[str, Any], base: Path) -> Config:
    root = Table(data, "")
    server = root.table("server")
    tls_table = root.table("tls")
    cache = root.table("cache")
    login = root.table("login")
    failover = root.table("failover")
    log = root.table("log")

    def path_of(table: Table, name: str, required: bool = True) -> Path | None:
        raw = table.require(name, str) if required else table.get(name, str)
        return None if raw is None else (base / raw).resolve()

    tls = TlsSettings(
        cert=_some(path_of(tls_table, "cert")),
        key=_some(path_of(tls_table, "key")),
        ca=_some(path_of(tls_table, "ca")),
        kernel_tls=tls_table.get("kernel_tls", bool, True),
    )
    clients = _parse_clients(root.table("clients"))
    exports = _parse_exports(root.table("exports"), clients, base)

    listen = server.get("listen", (str, list), list(DEFAULT_LISTEN))
    listen = (listen,) if isinstance(listen, str) else tuple(listen)
    if not listen or not all(isinstance(a, str) and a for a in listen):
        raise ConfigError("server.listen: expected an address or a list of addresses")
    port = server.get("port", int, DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError(f"server.port: must be 1..65535, got {port}")
    max_payload = parse_size(
        server.get("max_payload", (int, str), MAX_PAYLOAD), "server.max_payload"
    )
    if not 4096 <= max_payload <= MAX_PAYLOAD or max_payload % 4096:
        raise ConfigError(f"server.max_payload: must be a multiple of 4096 up to {MAX_PAYLOAD}")
    inflight_bytes = parse_size(
        server.get("max_inflight_bytes", (int, str), DEFAULT_MAX_INFLIGHT_BYTES),
        "server.max_inflight_bytes",
    )
    if inflight_bytes < max_payload:
        raise ConfigError("server.max_inflight_bytes: must be at least server.max_payload")
    control = server.get("control_socket", str, str(DEFAULT_CONTROL_SOCKET))
    log_format, log_level = log_settings(log, LOG_LEVELS)
    policy = FailoverPolicy(
        instance=failover.get("instance", str, default_instance(port)),
        lease_interval=failover.positive("lease_interval", DEFAULT_LEASE_INTERVAL, float),
        takeover_after=failover.positive("takeover_after", DEFAULT_TAKEOVER_AFTER, float),
    )
    if not policy.instance or not policy.instance.isprintable():
        raise ConfigError("failover.instance: must be a non-empty printable name")
    if policy.takeover_after < 2 * policy.lease_interval:
        raise ConfigError(
            "failover.takeover_after: must be at least twice failover.lease_interval "
            f"({policy.takeover_after} < 2 x {policy.lease_interval})"
        )

    config = Config(
        tls=tls,
        clients=clients,
        exports=exports,
        listen=listen,
        port=port,
        max_inflight=server.positive("max_inflight", DEFAULT_MAX_INFLIGHT),
        max_inflight_bytes=inflight_bytes,
        max_payload=max_payload,
        max_connections=server.positive("max_connections", DEFAULT_MAX_CONNECTIONS),
        max_connections_per_client=server.positive(
            "max_connections_per_client", DEFAULT_MAX_CONNECTIONS_PER_CLIENT
        ),
        workers=server.positive("workers", DEFAULT_WORKERS),
        shutdown_timeout=server.positive("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT, float),
        control_socket=(base / control).resolve() if control else None,
        login=LoginPolicy(
            max_failures=login.positive("max_failures", DEFAULT_MAX_LOGIN_FAILURES),
            window=login.positive("window", DEFAULT_FAILURE_WINDOW, float),
            timeout=login.positive("timeout", DEFAULT_LOGIN_TIMEOUT, float),
            max_pending=login.positive("max_pending", DEFAULT_MAX_PENDING),
            max_pending_per_peer=login.positive(
                "max_pending_per_peer", DEFAULT_MAX_PENDING_PER_PEER
            ),
        ),
        failover=policy,
        log_format=log_format,
        log_level=log_level,
        notices=_cache_notices(cache),
    )
    for table in (server, tls_table, cache, login, failover, log, root):
        table.finish()
    return config


def _some(path: Path | None) -> Path:
    assert path is not None
    return path


def _parse_clients(table: Table) -> dict[str, ClientConfig]:
    clients = {}
    for name in table.data:
        try:
            validate_client_name(name)
        except ValueError as exc:
            raise ConfigError(f"clients.{name}: {exc}") from None
        entry = table.table(name)
        token_hash = entry.require("token_hash", str)
        if not token_hash.startswith("$argon2id$"):
            raise ConfigError(f"clients.{name}.token_hash: expected an argon2id hash")
        entry.finish()
        clients[name] = ClientConfig(name=name, token_hash=token_hash)
    return clients


def _parse_location(entry: Table, base: Path) -> Location:
    """``volume = "path"`` or ``rbd = { pool, image, conf, client, keyring }``."""
    if ("volume" in entry.data) == ("rbd" in entry.data):
        raise ConfigError(f"{entry.where}: set exactly one of volume or rbd")
    if "volume" in entry.data:
        path: str = entry.require("volume", str)
        return (base / path).resolve()
    rbd = entry.table("rbd")
    keyring = rbd.get("keyring", str)
    location = RbdImage(
        pool=rbd.require("pool", str),
        image=rbd.require("image", str),
        conf=(base / rbd.get("conf", str, "/etc/ceph/ceph.conf")).resolve(),
        client=rbd.require("client", str).removeprefix("client."),
        keyring=(base / keyring).resolve() if keyring else None,
    )
    for key in ("pool", "image", "client"):
        if not getattr(location, key):
            raise ConfigError(f"{rbd.key(key)}: must not be empty")
    rbd.finish()
    return location


def _parse_exports(
    table: Table, clients: Mapping[str, ClientConfig], base: Path
) -> dict[str, ExportConfig]:
    exports = {}
    for name in table.data:
        try:
            validate_export_name(name)
        except ValueError as exc:
            raise ConfigError(f"exports.{name}: {exc}") from None
        entry = table.table(name)
        volume = _parse_location(entry, base)
        pass_file = entry.get("passphrase_file", str)
        pass_env = entry.get("passphrase_env", str)
        if (pass_file is None) == (pass_env is None):
            raise ConfigError(
                f"exports.{name}: set exactly one of passphrase_file or passphrase_env"
            )
        access_table = entry.table("access")
        access = {}
        for client, right in access_table.data.items():
            if client not in clients:
                raise ConfigError(f"exports.{name}.access.{client}: unknown client")
            try:
                access[client] = Access(access_table.get(client, str))
            except ValueError:
                raise ConfigError(
                    f"exports.{name}.access.{client}: expected 'rw', 'ro' or 'none', got {right!r}"
                ) from None
        access_table.finish()
        exports[name] = ExportConfig(
            name=name,
            volume=volume,
            passphrase_file=(base / pass_file).resolve() if pass_file else None,
            passphrase_env=pass_env,
            access=access,
            trim=entry.get("trim", bool, True),
        )
        entry.finish()
    return exports
