"""Generic netlink messages laid out by hand, the way the kernel builds them
(genlmsg_put + nla_put_*), independent of pyroute2's encoder."""

from __future__ import annotations

import struct

from netblk.protocol.constants import GENL_VERSION, GenlAttr, GenlCmd
from tls_bridge.genl import NetblkGenlMsg

FAMILY_ID = 0x1D
NLMSGHDR = struct.Struct("=IHHII")
GENLMSGHDR = struct.Struct("=BBH")
NLA = struct.Struct("=HH")


def nla(attr: GenlAttr, payload: bytes) -> bytes:
    raw = NLA.pack(NLA.size + len(payload), attr) + payload
    return raw + bytes(-len(raw) % 4)


def kernel_message(cmd: GenlCmd, *attrs: bytes) -> NetblkGenlMsg:
    """Bytes as the driver's genlmsg_put + nla_put_* would lay them out."""
    body = GENLMSGHDR.pack(cmd, GENL_VERSION, 0) + b"".join(attrs)
    data = NLMSGHDR.pack(NLMSGHDR.size + len(body), FAMILY_ID, 0, 7, 0) + body
    msg = NetblkGenlMsg(data)
    msg.decode()
    return msg


def string(text: str) -> bytes:
    return text.encode() + b"\0"  # nla_put_string includes the NUL


ACCEPT_REPLY = (
    nla(GenlAttr.DEVICE, struct.pack("=I", 3)),
    nla(GenlAttr.SOCKFD, struct.pack("=i", 9)),
    nla(GenlAttr.PAD, b""),  # nla_put_u64_64bit may pad before a u64
    nla(GenlAttr.COOKIE, struct.pack("=Q", 0xFEED_0000_0000_0001)),
    nla(GenlAttr.PEER_ADDR, string("fd00::7")),
    nla(GenlAttr.PEER_PORT, struct.pack("=H", 10910)),
    nla(GenlAttr.EXPORT, string("data")),
    nla(GenlAttr.TIMEOUT_MS, struct.pack("=I", 15000)),
)
