"""The generic netlink messages, byte for byte against a hand-written
encoder/decoder that follows the kernel's netlink layout (not pyroute2)."""

from __future__ import annotations

import struct

import pytest

from netblk.protocol.codec import ExportGeometry
from netblk.protocol.constants import (
    GENL_REASON_MAX,
    GENL_VERSION,
    ExportFlag,
    GenlAttr,
    GenlCmd,
)
from tests.tls_bridge.genl_bytes import (
    ACCEPT_REPLY,
    FAMILY_ID,
    GENLMSGHDR,
    NLA,
    NLMSGHDR,
    kernel_message,
    nla,
)
from tls_bridge.genl import (
    ATTR_TYPES,
    Done,
    HandshakeRequest,
    MalformedMessage,
    NetblkGenlMsg,
    Ready,
    accept_message,
    clip_reason,
    done_message,
    parse_accept_reply,
    parse_ready,
)


def our_bytes(msg: NetblkGenlMsg) -> tuple[int, dict[int, bytes]]:
    """Encode one of our messages and split it like the kernel parser would."""
    msg["header"]["type"] = FAMILY_ID
    msg.encode()
    data = bytes(msg.data)
    length, msg_type, _flags, _seq, _pid = NLMSGHDR.unpack_from(data)
    assert (length, msg_type) == (len(data), FAMILY_ID)
    cmd, version, _reserved = GENLMSGHDR.unpack_from(data, NLMSGHDR.size)
    assert version == GENL_VERSION
    attrs: dict[int, bytes] = {}
    offset = NLMSGHDR.size + GENLMSGHDR.size
    while offset < length:
        attr_len, attr_type = NLA.unpack_from(data, offset)
        assert attr_type not in attrs
        attrs[attr_type] = data[offset + NLA.size : offset + attr_len]
        offset += (attr_len + 3) & ~3
    assert offset == length
    return cmd, attrs


def test_the_attribute_map_mirrors_the_header_in_order() -> None:
    # pyroute2 maps an attribute's type number to its position in nla_map.
    assert [name for name, _ in NetblkGenlMsg.nla_map] == [
        f"NETBLK_GENL_A_{attr.name}" for attr in sorted(GenlAttr)
    ]
    assert set(ATTR_TYPES) == set(GenlAttr)


def test_accept_reply_is_parsed() -> None:
    request = parse_accept_reply(kernel_message(GenlCmd.ACCEPT, *ACCEPT_REPLY))
    assert request == HandshakeRequest(
        device=3,
        sockfd=9,
        cookie=0xFEED_0000_0000_0001,
        peer_addr="fd00::7",
        peer_port=10910,
        export="data",
        timeout_ms=15000,
    )


def test_accept_reply_missing_attributes_still_names_cookie_and_fd() -> None:
    partial = [a for a in ACCEPT_REPLY if NLA.unpack_from(a)[1] != GenlAttr.EXPORT]
    partial = [a for a in partial if NLA.unpack_from(a)[1] != GenlAttr.TIMEOUT_MS]
    with pytest.raises(MalformedMessage, match="lacks EXPORT, TIMEOUT_MS") as info:
        parse_accept_reply(kernel_message(GenlCmd.ACCEPT, *partial))
    assert (info.value.cookie, info.value.sockfd) == (0xFEED_0000_0000_0001, 9)
    with pytest.raises(MalformedMessage) as info:
        parse_accept_reply(kernel_message(GenlCmd.ACCEPT))
    assert (info.value.cookie, info.value.sockfd) == (None, None)


def test_ready_attributes_are_optional() -> None:
    assert parse_ready(kernel_message(GenlCmd.READY)) == Ready()
    ready = kernel_message(GenlCmd.READY, nla(GenlAttr.DEVICE, struct.pack("=I", 0)))
    assert parse_ready(ready) == Ready(device=0)


def test_accept_carries_no_attributes() -> None:
    assert our_bytes(accept_message()) == (GenlCmd.ACCEPT, {})


def test_successful_done() -> None:
    geometry = ExportGeometry(
        size=1 << 40,
        flags=ExportFlag.READ_ONLY | ExportFlag.SEND_FLUSH,
        max_payload=1 << 20,
        max_inflight=64,
    )
    cmd, attrs = our_bytes(
        done_message(Done(cookie=2**64 - 1, sockfd=11, status=0, geometry=geometry))
    )
    assert cmd == GenlCmd.DONE
    assert attrs == {
        GenlAttr.COOKIE: struct.pack("=Q", 2**64 - 1),
        GenlAttr.SOCKFD: struct.pack("=i", 11),
        GenlAttr.STATUS: struct.pack("=I", 0),
        GenlAttr.EXPORT_SIZE: struct.pack("=Q", 1 << 40),
        GenlAttr.EXPORT_FLAGS: struct.pack("=I", 0b11),
        GenlAttr.MAX_PAYLOAD: struct.pack("=I", 1 << 20),
        GenlAttr.MAX_INFLIGHT: struct.pack("=I", 64),
    }


def test_failed_done_carries_a_clipped_reason_and_no_geometry() -> None:
    reason = "server certificate is for " + ", ".join(f"host{i}.example" for i in range(20))
    cmd, attrs = our_bytes(done_message(Done(cookie=1, sockfd=4, status=13, reason=reason)))
    assert cmd == GenlCmd.DONE
    assert set(attrs) == {GenlAttr.COOKIE, GenlAttr.SOCKFD, GenlAttr.STATUS, GenlAttr.REASON}
    assert attrs[GenlAttr.STATUS] == struct.pack("=I", 13)
    text = attrs[GenlAttr.REASON]
    assert text.endswith(b"...\0")
    assert len(text) == GENL_REASON_MAX  # with its NUL
    assert text.startswith(b"server certificate is for host0.example")


def test_clip_reason_keeps_short_ascii_and_replaces_the_rest() -> None:
    assert clip_reason("login refused") == "login refused"
    assert clip_reason("caf\u00e9\nbar") == "caf??bar"
    assert len(clip_reason("x" * 500)) == GENL_REASON_MAX - 1
