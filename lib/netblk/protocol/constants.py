"""Mirror of kmod/include/uapi/linux/netblk.h, the one definition of the wire.

Every name here is the C name without its ``NETBLK_`` prefix (and, for the
enums, without the group prefix).  tests/netblk/test_uapi_drift.py compiles
the header and fails if a value, a struct size or a field offset differs, or if
the header defines something this module does not mirror.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

PROTO_VERSION = 1
DEFAULT_PORT = 10910

HELLO_MAGIC = 0x4E424C48
REQUEST_MAGIC = 0x4E424C51
REPLY_MAGIC = 0x4E424C52

BLOCK_SIZE = 4096
MAX_PAYLOAD = 1 << 20
MAX_EXPORT_NAME = 64
MAX_TOKEN = 256
MIN_TOKEN = 16


class Cmd(IntEnum):
    """Request opcodes (``NETBLK_CMD_*``)."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    TRIM = 3
    WRITE_ZEROES = 4
    DISCONNECT = 5


class CmdFlag(IntFlag):
    """Request flags (``NETBLK_CMD_FLAG_*``)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1


CMD_FLAGS_ALL = 0x0003


class ExportFlag(IntFlag):
    """What an export offers (``NETBLK_EXPORT_*``)."""

    READ_ONLY = 1 << 0
    SEND_FLUSH = 1 << 1
    SEND_FUA = 1 << 2
    SEND_TRIM = 1 << 3
    SEND_WRITE_ZEROES = 1 << 4
    MULTI_CONN = 1 << 5


class LoginStatus(IntEnum):
    """Answer to HELLO (``NETBLK_LOGIN_*``)."""

    OK = 0
    BAD_VERSION = 1
    BAD_REQUEST = 2
    DENIED = 3
    NO_EXPORT = 4
    FORBIDDEN = 5
    RATE_LIMITED = 6
    UNAVAILABLE = 7


class Errno(IntEnum):
    """Reply errors (``NETBLK_E*``); the values are Linux errnos."""

    OK = 0
    PERM = 1
    IO = 5
    NOMEM = 12
    INVAL = 22
    NOSPC = 28
    OVERFLOW = 75
    NOTSUP = 95
    SHUTDOWN = 108


@dataclass(frozen=True)
class WireStruct:
    """A C wire struct: its name, field names and big-endian layout."""

    c_name: str
    fields: tuple[str, ...]
    layout: struct.Struct

    @property
    def size(self) -> int:
        return self.layout.size

    def offsets(self) -> dict[str, int]:
        """Byte offset of each field, as ``offsetof`` would report it."""
        codes = self.layout.format.lstrip(">")
        return {name: struct.calcsize(">" + codes[:i]) for i, name in enumerate(self.fields)}


HELLO = WireStruct(
    "netblk_hello",
    ("magic", "version", "flags", "export_len", "token_len", "reserved"),
    struct.Struct(">IHHHHI"),
)
HELLO_REPLY = WireStruct(
    "netblk_hello_reply",
    (
        "magic",
        "version",
        "status",
        "export_size",
        "block_size",
        "max_payload",
        "export_flags",
        "max_inflight",
    ),
    struct.Struct(">IHHQIIII"),
)
REQUEST = WireStruct(
    "netblk_request",
    ("magic", "flags", "opcode", "handle", "offset", "length", "reserved"),
    struct.Struct(">IHHQQII"),
)
REPLY = WireStruct(
    "netblk_reply",
    ("magic", "error", "handle"),
    struct.Struct(">IIQ"),
)

WIRE_STRUCTS = (HELLO, HELLO_REPLY, REQUEST, REPLY)

# Generic netlink handshake upcall between netblk.ko and tls-bridge.
GENL_NAME = "netblk"
GENL_VERSION = 1
GENL_MCGRP_HANDSHAKE = "handshake"
GENL_REASON_MAX = 128


class GenlCmd(IntEnum):
    """Generic netlink commands (``NETBLK_GENL_CMD_*``)."""

    UNSPEC = 0
    READY = 1
    ACCEPT = 2
    DONE = 3


GENL_CMD_MAX = max(GenlCmd)


class GenlAttr(IntEnum):
    """Generic netlink attributes (``NETBLK_GENL_A_*``)."""

    UNSPEC = 0
    PAD = 1
    DEVICE = 2
    SOCKFD = 3
    COOKIE = 4
    PEER_ADDR = 5
    PEER_PORT = 6
    EXPORT = 7
    TIMEOUT_MS = 8
    STATUS = 9
    REASON = 10
    EXPORT_SIZE = 11
    EXPORT_FLAGS = 12
    MAX_PAYLOAD = 13
    MAX_INFLIGHT = 14


GENL_A_MAX = max(GenlAttr)


# The driver's sysfs contract (/sys/block/netblkN/): numeric attributes'
# ranges and defaults, the words ``state`` shows, the keys ``stats`` shows.
MAX_SERVERS = 8
REQUEST_TIMEOUT_MS_MIN = 100
REQUEST_TIMEOUT_MS_MAX = 3_600_000
REQUEST_TIMEOUT_MS_DEFAULT = 30_000
DEAD_TIMEOUT_MS_MIN = 0
DEAD_TIMEOUT_MS_MAX = 86_400_000
DEAD_TIMEOUT_MS_DEFAULT = 30_000
RECONNECT_RETRIES_MIN = 0
RECONNECT_RETRIES_MAX = 1_000_000
RECONNECT_RETRIES_DEFAULT = 100
#: NETBLK_SYSFS_STATES, in order.
SYSFS_STATES = ("disconnected", "connecting", "handshaking", "connected", "reconnecting", "error")
#: NETBLK_SYSFS_STATS, in the order ``stats`` shows them.
SYSFS_STATS = (
    "read_bytes",
    "write_bytes",
    "read_requests",
    "write_requests",
    "flush_requests",
    "discard_requests",
    "write_zeroes_requests",
    "errors",
    "timeouts",
    "reconnects",
    "failovers",
    "inflight",
)
#: The numeric attributes: name -> (min, max, default).
SYSFS_RANGES = {
    "request_timeout_ms": (
        REQUEST_TIMEOUT_MS_MIN,
        REQUEST_TIMEOUT_MS_MAX,
        REQUEST_TIMEOUT_MS_DEFAULT,
    ),
    "dead_timeout_ms": (DEAD_TIMEOUT_MS_MIN, DEAD_TIMEOUT_MS_MAX, DEAD_TIMEOUT_MS_DEFAULT),
    "reconnect_retries": (
        RECONNECT_RETRIES_MIN,
        RECONNECT_RETRIES_MAX,
        RECONNECT_RETRIES_DEFAULT,
    ),
}
