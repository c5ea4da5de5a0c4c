"""netblk's generic netlink handshake messages, without a socket.

The upcall contract is kmod/include/uapi/linux/netblk.h (mirrored in
netblk.protocol.constants): the driver multicasts READY on the
"handshake" group; we send ACCEPT (no attributes: the driver hands out its
oldest waiting socket) and its reply installs the socket as an fd in this
process and describes it; after TLS and login we send DONE naming the cookie
and fd.  pyroute2 does the netlink framing; this module maps its messages to
frozen dataclasses and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import genlmsg  # type: ignore[import-untyped]

from netblk.protocol.codec import ExportGeometry
from netblk.protocol.constants import GENL_REASON_MAX, GENL_VERSION, GenlAttr, GenlCmd

#: pyroute2 NLA type of each attribute (the comments in the UAPI header).
ATTR_TYPES: dict[GenlAttr, str] = {
    GenlAttr.UNSPEC: "none",
    GenlAttr.PAD: "none",  # alignment filler the kernel adds before u64s
    GenlAttr.DEVICE: "uint32",
    GenlAttr.SOCKFD: "int32",
    GenlAttr.COOKIE: "uint64",
    GenlAttr.PEER_ADDR: "asciiz",
    GenlAttr.PEER_PORT: "uint16",
    GenlAttr.EXPORT: "asciiz",
    GenlAttr.TIMEOUT_MS: "uint32",
    GenlAttr.STATUS: "uint32",
    GenlAttr.REASON: "asciiz",
    GenlAttr.EXPORT_SIZE: "uint64",
    GenlAttr.EXPORT_FLAGS: "uint32",
    GenlAttr.MAX_PAYLOAD: "uint32",
    GenlAttr.MAX_INFLIGHT: "uint32",
}


def nla_name(attr: GenlAttr) -> str:
    return f"NETBLK_GENL_A_{attr.name}"


class NetblkGenlMsg(genlmsg):  # type: ignore[misc]
    """A netblk generic netlink message (pyroute2 encodes and decodes it)."""

    prefix = "NETBLK_GENL_A_"
    nla_map = tuple((nla_name(attr), ATTR_TYPES[attr]) for attr in GenlAttr)


class MalformedMessage(Exception):
    """A message from the kernel lacks an attribute the contract requires.

    ``cookie`` and ``sockfd`` are set when the message had them, so the
    handshake can still be failed cleanly and the fd closed.
    """

    def __init__(self, reason: str, cookie: int | None, sockfd: int | None) -> None:
        super().__init__(reason)
        self.cookie = cookie
        self.sockfd = sockfd


@dataclass(frozen=True)
class Ready:
    """A socket awaits its handshake on /dev/netblk``device`` (informational:
    ACCEPT takes the oldest waiting socket, whichever device it is for)."""

    device: int | None = None


@dataclass(frozen=True)
class EventsLost:
    """The multicast queue overflowed: READY events were dropped."""


@dataclass(frozen=True)
class HandshakeRequest:
    """The ACCEPT reply: an fd now open in this process, and what it is for."""

    device: int
    sockfd: int
    cookie: int
    peer_addr: str
    peer_port: int
    export: str
    timeout_ms: int


@dataclass(frozen=True)
class Done:
    """Our answer: ``status`` 0 with the export's geometry, or an errno and why."""

    cookie: int
    sockfd: int
    status: int
    reason: str = ""
    geometry: ExportGeometry | None = None


def _message(cmd: GenlCmd, attrs: list[tuple[str, Any]]) -> NetblkGenlMsg:
    msg = NetblkGenlMsg()
    msg["cmd"] = cmd
    msg["version"] = GENL_VERSION
    msg["attrs"] = attrs
    return msg


def _attr(msg: NetblkGenlMsg, attr: GenlAttr) -> Any:
    return msg.get_attr(nla_name(attr))


def accept_message() -> NetblkGenlMsg:
    return _message(GenlCmd.ACCEPT, [])


def parse_ready(msg: NetblkGenlMsg) -> Ready:
    return Ready(device=_attr(msg, GenlAttr.DEVICE))


#: HandshakeRequest's fields, in order.
_ACCEPT_ATTRS = (
    GenlAttr.DEVICE,
    GenlAttr.SOCKFD,
    GenlAttr.COOKIE,
    GenlAttr.PEER_ADDR,
    GenlAttr.PEER_PORT,
    GenlAttr.EXPORT,
    GenlAttr.TIMEOUT_MS,
)


def parse_accept_reply(msg: NetblkGenlMsg) -> HandshakeRequest:
    """Raises MalformedMessage if a required attribute is missing."""
    values = {attr: _attr(msg, attr) for attr in _ACCEPT_ATTRS}
    missing = [attr.name for attr, value in values.items() if value is None]
    if missing:
        raise MalformedMessage(
            f"ACCEPT reply lacks {', '.join(missing)}",
            values[GenlAttr.COOKIE],
            values[GenlAttr.SOCKFD],
        )
    return HandshakeRequest(*(values[attr] for attr in _ACCEPT_ATTRS))


def done_message(done: Done) -> NetblkGenlMsg:
    attrs: list[tuple[str, Any]] = [
        (nla_name(GenlAttr.COOKIE), done.cookie),
        (nla_name(GenlAttr.SOCKFD), done.sockfd),
        (nla_name(GenlAttr.STATUS), done.status),
    ]
    if done.reason:
        attrs.append((nla_name(GenlAttr.REASON), clip_reason(done.reason)))
    if done.geometry is not None:
        attrs += [
            (nla_name(GenlAttr.EXPORT_SIZE), done.geometry.size),
            (nla_name(GenlAttr.EXPORT_FLAGS), int(done.geometry.flags)),
            (nla_name(GenlAttr.MAX_PAYLOAD), done.geometry.max_payload),
            (nla_name(GenlAttr.MAX_INFLIGHT), done.geometry.max_inflight),
        ]
    return _message(GenlCmd.DONE, attrs)


def clip_reason(reason: str) -> str:
    """Printable ASCII that fits NETBLK_GENL_REASON_MAX with its NUL."""
    text = "".join(c if " " <= c <= "~" else "?" for c in reason)
    limit = GENL_REASON_MAX - 1
    return text if len(text) <= limit else text[: limit - 3] + "..."
