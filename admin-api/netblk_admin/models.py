"""Request and response bodies.  Every field is validated here, before any
sysfs write, with the driver's own rules (kmod/README.md, "sysfs")."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Required

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from netblk.addresses import host_port
from netblk.protocol.constants import (
    DEAD_TIMEOUT_MS_MAX,
    DEAD_TIMEOUT_MS_MIN,
    MAX_EXPORT_NAME,
    MAX_SERVERS,
    RECONNECT_RETRIES_MAX,
    RECONNECT_RETRIES_MIN,
    REQUEST_TIMEOUT_MS_MAX,
    REQUEST_TIMEOUT_MS_MIN,
)
from netblk.protocol.names import NAME_RE, validate_export_name
from netblk_admin.sysfs import CONFIG_ATTRS, TARGET_ATTRS, Snapshot, State

# The driver refuses anything outside its ranges (netblk.protocol.constants,
# from the UAPI header) with -EINVAL.
PORT_MIN, PORT_MAX = 1, 65535

#: connect/disconnect ``?wait=true``: how long by default and at most (seconds).
DEFAULT_WAIT = 60.0
MAX_WAIT = 600.0

#: A number as JSON writes it: pydantic alone also takes " 5", "+5", ".5", "5_0".
JSON_NUMBER_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _query_boolean(value: object) -> bool:
    # pydantic alone also takes yes, on, 1, t, True...; the schema's boolean is true or false.
    if value == "true":
        return True
    if value == "false":
        return False
    raise PydanticCustomError("bool_parsing", "Input should be true or false")


def _query_number(value: object) -> float:
    if isinstance(value, str) and JSON_NUMBER_RE.fullmatch(value):
        return float(value)
    raise PydanticCustomError("float_parsing", "Input should be a number written as in JSON")


# Query values are text: these take the schema's boolean and number as JSON
# spells them.  The validator comes last, so the bounds stay in the schema.
QueryBoolean = Annotated[bool, BeforeValidator(_query_boolean)]
#: ``?timeout=``: seconds.
WaitSeconds = Annotated[float, Field(gt=0, le=MAX_WAIT), BeforeValidator(_query_number)]


def _ip_literal(value: str) -> str:
    """An IPv4 or IPv6 literal without a scope id, in canonical form."""
    if "%" in value:
        raise ValueError("scope ids (%...) are not supported: give a plain address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("not an IPv4 or IPv6 address literal") from None


IpLiteral = Annotated[
    str,
    AfterValidator(_ip_literal),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]}
    ),
]


# Request bodies are strict: each field takes its schema's JSON type and no
# other, so an integer is 10910 (not 10910.0, 1.091e4, "10910" or true).
@with_config(ConfigDict(extra="forbid", strict=True))
class ServerAddress(TypedDict, total=False):
    """One entry of the server list: an address, and a port unless the
    entry uses server_port's."""

    ip: Required[IpLiteral]
    port: Annotated[int, Field(ge=PORT_MIN, le=PORT_MAX)]


def server_text(server: ServerAddress) -> str:
    """The entry as the driver's ``servers`` file takes and shows it."""
    ip = server["ip"]
    if "port" not in server:
        return ip
    return host_port(ip, server["port"])


def parse_server_text(text: str) -> ServerAddress:
    """The inverse of server_text, for what the driver shows."""
    if text.startswith("["):
        ip, _, rest = text[1:].partition("]")
        return {"ip": ip, "port": int(rest[1:])} if rest else {"ip": ip}
    if text.count(":") == 1:
        ip, port = text.split(":")
        return {"ip": ip, "port": int(port)}
    return {"ip": text}


def _distinct(servers: list[ServerAddress]) -> list[ServerAddress]:
    if len({server_text(server) for server in servers}) != len(servers):
        raise ValueError("a server is listed twice")
    return servers


# The protocol's one name rule does the validating; the schema only describes it.
ExportName = Annotated[
    str,
    AfterValidator(validate_export_name),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_EXPORT_NAME,
            "pattern": f"^{NAME_RE.pattern}$",
        }
    ),
]


# typing_extensions' TypedDict: pydantic needs it on Python < 3.12.
@with_config(
    ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"minProperties": 1, "not": {"required": ["servers", "server_ip"]}},
    )
)
class ConfigPatch(TypedDict, total=False):
    """The fields to change; the others keep their values.  servers,
    server_ip, server_port and export change only while the device is
    disconnected or in error; the rest at any time.  servers is the list
    tried in order on connect and on failover; server_ip sets a list of
    one (give one of the two)."""

    servers: Annotated[
        list[ServerAddress],
        Field(min_length=1, max_length=MAX_SERVERS, json_schema_extra={"uniqueItems": True}),
        AfterValidator(_distinct),
    ]
    server_ip: IpLiteral
    server_port: Annotated[int, Field(ge=PORT_MIN, le=PORT_MAX)]
    export: ExportName
    request_timeout_ms: Annotated[int, Field(ge=REQUEST_TIMEOUT_MS_MIN, le=REQUEST_TIMEOUT_MS_MAX)]
    dead_timeout_ms: Annotated[int, Field(ge=DEAD_TIMEOUT_MS_MIN, le=DEAD_TIMEOUT_MS_MAX)]
    reconnect_retries: Annotated[int, Field(ge=RECONNECT_RETRIES_MIN, le=RECONNECT_RETRIES_MAX)]


def _not_empty(patch: ConfigPatch) -> ConfigPatch:
    if not patch:
        raise ValueError(f"give at least one of {', '.join(CONFIG_ATTRS)}")
    if "servers" in patch and "server_ip" in patch:
        raise ValueError("give servers or server_ip, not both: server_ip sets a list of one")
    return patch


ConfigPatchBody = Annotated[ConfigPatch, AfterValidator(_not_empty)]


def sysfs_values(patch: ConfigPatch) -> dict[str, str]:
    """What to write, attribute by attribute, in CONFIG_ATTRS order."""
    values: Mapping[str, object] = patch
    text = {attr: str(values[attr]) for attr in CONFIG_ATTRS if attr in values}
    if "servers" in patch:
        text["servers"] = " ".join(map(server_text, patch["servers"]))
    return text


def touches_target(patch: ConfigPatch) -> bool:
    return not patch.keys().isdisjoint(TARGET_ATTRS)


class DeviceConfig(BaseModel):
    servers: list[ServerAddress] = Field(description="the server list, in order; empty until set")
    server_ip: str | None = Field(description="the first server's address; null until set")
    server_port: int
    export: str | None = Field(description="null until set")
    request_timeout_ms: int
    dead_timeout_ms: int
    reconnect_retries: int

    @classmethod
    def from_sysfs(cls, values: dict[str, str]) -> DeviceConfig:
        return cls(
            servers=[parse_server_text(text) for text in values["servers"].split()],
            server_ip=values["server_ip"] or None,
            server_port=int(values["server_port"]),
            export=values["export"] or None,
            request_timeout_ms=int(values["request_timeout_ms"]),
            dead_timeout_ms=int(values["dead_timeout_ms"]),
            reconnect_retries=int(values["reconnect_retries"]),
        )


class Device(BaseModel):
    name: str = Field(examples=["netblk0"])
    state: State
    last_error: str | None = Field(description="why the last attempt failed; null when empty")
    current_server: str | None = Field(
        description="the server connected to or being tried (ADDR:PORT); null when idle"
    )
    config: DeviceConfig
    stats: dict[str, int] = Field(
        description="the driver's counters since the module was loaded (kmod/README.md)"
    )

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> Device:
        return cls(
            name=snapshot.name,
            state=snapshot.state,
            last_error=snapshot.last_error or None,
            current_server=snapshot.current_server or None,
            config=DeviceConfig.from_sysfs(dict(snapshot.config)),
            stats=dict(snapshot.stats),
        )


class DeviceList(BaseModel):
    devices: list[Device]


class Health(BaseModel):
    status: Literal["ok"]
    devices: int = Field(description="netblk devices found under the sysfs root")


class FieldIssue(BaseModel):
    loc: list[str | int] = Field(description="where: body, query or path, then the field")
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error answer, whatever the status."""

    error: str = Field(description="a stable machine-readable reason", examples=["busy"])
    detail: str | list[FieldIssue] = Field(description="what went wrong, for people")
    state: State | None = Field(
        default=None, description="the device's state, when it decided the answer"
    )
    last_error: str | None = Field(default=None, description="the driver's last_error, if any")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
