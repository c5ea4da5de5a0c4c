"""The sans-IO codec: framing, validation, and fuzzing with hypothesis."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netblk.protocol.codec import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    Disconnect,
    ExportGeometry,
    Hello,
    HelloReply,
    InvalidRequest,
    ProtocolError,
    Reply,
    Request,
    ServerConnection,
    encode_hello,
    encode_reply,
    encode_request,
)
from netblk.protocol.constants import (
    BLOCK_SIZE,
    HELLO_MAGIC,
    HELLO_REPLY,
    MAX_PAYLOAD,
    PROTO_VERSION,
    REQUEST,
    Cmd,
    CmdFlag,
    Errno,
    ExportFlag,
    LoginStatus,
)
from storaged.session import scanner_for
from tests.netblk.protocol.accepted import ALL_FLAGS, TOKEN, accepted

SIZE = 1 << 20


def logged_in(flags: ExportFlag = ALL_FLAGS, size: int = SIZE) -> ServerConnection:
    return accepted(ExportGeometry(size=size, flags=flags))


def feed(conn: ServerConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    events: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed | Disconnect):
            break
    return events


def test_hello_and_accept_reply() -> None:
    conn = ServerConnection(scanner_for)
    conn.receive_data(encode_hello("data", TOKEN)[:10])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(encode_hello("data", TOKEN)[10:])
    assert conn.next_event() == Hello(version=1, export="data", token=TOKEN)
    reply = conn.accept(ExportGeometry(size=SIZE, flags=ExportFlag.READ_ONLY, max_inflight=7))
    fields = HELLO_REPLY.layout.unpack(reply)
    assert fields[2:] == (LoginStatus.OK, SIZE, BLOCK_SIZE, MAX_PAYLOAD, ExportFlag.READ_ONLY, 7)


@pytest.mark.parametrize(
    ("frame", "status"),
    [
        (encode_hello("data", TOKEN, version=2), LoginStatus.BAD_VERSION),
        (encode_hello("data", b"short"), LoginStatus.BAD_REQUEST),
        (encode_hello("../etc", TOKEN), LoginStatus.BAD_REQUEST),
        (encode_hello("x" * 65, TOKEN), LoginStatus.BAD_REQUEST),
        (struct.pack(">IHHHHI", 0x4E424C48, 1, 0, 0, 32, 0) + TOKEN, LoginStatus.BAD_REQUEST),
        (
            struct.pack(">IHHHHI", 0x4E424C48, 1, 1, 4, 32, 0) + b"data" + TOKEN,
            LoginStatus.BAD_REQUEST,
        ),
    ],
)
def test_bad_hello_is_answered_then_fatal(frame: bytes, status: LoginStatus) -> None:
    conn = ServerConnection(scanner_for)
    conn.receive_data(frame)
    with pytest.raises(ProtocolError) as caught:
        conn.next_event()
    assert HELLO_REPLY.layout.unpack(caught.value.reply)[2] == status


def test_bad_hello_magic_closes_without_reply() -> None:
    conn = ServerConnection(scanner_for)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ProtocolError, match="magic") as caught:
        conn.next_event()
    assert caught.value.reply == b""


def test_write_then_read_out_of_order_replies() -> None:
    conn = logged_in()
    data = bytes(range(256)) * 16
    events = feed(conn, encode_request(Cmd.WRITE, 7, 4096, 4096, CmdFlag.FUA) + data)
    events += feed(conn, encode_request(Cmd.READ, 8, 0, 8192))
    assert events == [
        Request(Cmd.WRITE, CmdFlag.FUA, 7, 4096, 4096, data),
        Request(Cmd.READ, CmdFlag(0), 8, 0, 8192),
    ]
    assert conn.inflight == 2
    conn.send_reply(8, Errno.OK)
    conn.send_reply(7, Errno.OK)
    assert conn.inflight == 0


def test_write_payload_split_across_reads() -> None:
    conn = logged_in()
    frame = encode_request(Cmd.WRITE, 1, 0, 4096) + b"a" * 4096
    for i in range(0, len(frame) - 1, 1000):
        conn.receive_data(frame[i : i + 1000])
        if i + 1000 < len(frame):
            assert conn.next_event() is NEED_DATA
    assert isinstance(conn.next_event(), Request)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (encode_request(Cmd.READ, 1, 100, 4096), Errno.INVAL),  # unaligned offset
        (encode_request(Cmd.READ, 1, 0, 100), Errno.INVAL),  # unaligned length
        (encode_request(Cmd.READ, 1, 0, 0), Errno.INVAL),  # empty
        (encode_request(Cmd.READ, 1, SIZE, 4096), Errno.INVAL),  # beyond end
        (encode_request(Cmd.TRIM, 1, SIZE - 4096, 8192), Errno.INVAL),
        (encode_request(Cmd.WRITE_ZEROES, 1, SIZE, 4096), Errno.NOSPC),
        (encode_request(Cmd.READ, 1, 0, MAX_PAYLOAD + 4096), Errno.OVERFLOW),
        (encode_request(Cmd.FLUSH, 1, 4096, 0), Errno.INVAL),
        (encode_request(99, 1, 0, 4096), Errno.INVAL),  # unknown opcode
        (encode_request(Cmd.READ, 1, 0, 4096, CmdFlag.FUA), Errno.INVAL),
        (encode_request(Cmd.WRITE_ZEROES, 1, 0, 4096, 0x80), Errno.INVAL),
        (encode_request(Cmd.READ, 1, 2**64 - 4096, 4096), Errno.INVAL),  # wraps in C
    ],
)
def test_invalid_requests_get_an_error_reply(header: bytes, error: Errno) -> None:
    conn = logged_in()
    (event,) = feed(conn, header)
    assert isinstance(event, InvalidRequest)
    assert (event.handle, event.error) == (1, error)
    assert event.reason
    # The stream stays usable after a refused request.
    assert feed(conn, encode_request(Cmd.FLUSH, 2)) == [Request(Cmd.FLUSH, CmdFlag(0), 2, 0, 0)]


def test_reserved_field_must_be_zero() -> None:
    conn = logged_in()
    header = REQUEST.layout.pack(0x4E424C51, 0, Cmd.FLUSH, 5, 0, 0, 1)
    (event,) = feed(conn, header)
    assert isinstance(event, InvalidRequest)
    assert event.error is Errno.INVAL


def test_unaligned_write_consumes_its_payload() -> None:
    conn = logged_in()
    events = feed(conn, encode_request(Cmd.WRITE, 1, 512, 4096) + b"x" * 4096)
    events += feed(conn, encode_request(Cmd.FLUSH, 2))
    assert [type(e) for e in events] == [InvalidRequest, Request]


@pytest.mark.parametrize("op", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_read_only_export_refuses_changes(op: Cmd) -> None:
    conn = logged_in(ALL_FLAGS | ExportFlag.READ_ONLY)
    payload = b"z" * 4096 if op is Cmd.WRITE else b""
    (event,) = feed(conn, encode_request(op, 3, 0, 4096) + payload)
    assert isinstance(event, InvalidRequest)
    assert event.error is Errno.PERM


def test_unoffered_operation_is_not_supported() -> None:
    conn = logged_in(ExportFlag.SEND_FLUSH)
    (event,) = feed(conn, encode_request(Cmd.TRIM, 3, 0, 4096))
    assert isinstance(event, InvalidRequest)
    assert event.error is Errno.NOTSUP


def test_oversized_write_is_fatal() -> None:
    conn = logged_in()
    conn.receive_data(encode_request(Cmd.WRITE, 1, 0, MAX_PAYLOAD + 4096))
    with pytest.raises(ProtocolError, match="max payload"):
        conn.next_event()


def test_bad_request_magic_is_fatal() -> None:
    conn = logged_in()
    conn.receive_data(b"\xff" * REQUEST.size)
    with pytest.raises(ProtocolError, match="magic"):
        conn.next_event()


def test_duplicate_inflight_handle_is_fatal() -> None:
    conn = logged_in()
    feed(conn, encode_request(Cmd.READ, 9, 0, 4096))
    conn.receive_data(encode_request(Cmd.READ, 9, 4096, 4096))
    with pytest.raises(ProtocolError, match="already in flight"):
        conn.next_event()


def test_close_mid_frame_is_an_error_and_clean_close_is_not() -> None:
    conn = logged_in()
    conn.receive_data(encode_request(Cmd.WRITE, 1, 0, 4096) + b"half")
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="mid-frame"):
        conn.next_event()
    clean = logged_in()
    clean.receive_data(b"")
    assert isinstance(clean.next_event(), ConnectionClosed)


def test_disconnect_stops_parsing() -> None:
    conn = logged_in()
    events = feed(conn, encode_request(Cmd.DISCONNECT, 0) + b"trailing garbage")
    assert events == [Disconnect()]
    assert conn.next_event() is NEED_DATA


def test_client_matches_replies_by_handle_and_read_length() -> None:
    client = ClientConnection()
    client.send_hello("data", TOKEN)
    client.send_request(Cmd.READ, 1, 0, 8192)
    client.send_request(Cmd.WRITE, 2, 0, 4096)
    server_reply = HELLO_REPLY.layout.pack(
        0x4E424C48, 1, LoginStatus.OK, SIZE, BLOCK_SIZE, MAX_PAYLOAD, 0, 16
    )
    client.receive_data(server_reply + encode_reply(2, Errno.OK) + encode_reply(1, Errno.OK))
    client.receive_data(b"r" * 8192)
    assert isinstance(client.next_event(), HelloReply)
    assert client.next_event() == Reply(2, Errno.OK)
    assert client.next_event() == Reply(1, Errno.OK, b"r" * 8192)
    assert client.outstanding == 0


def test_client_rejects_reply_for_unknown_handle() -> None:
    client = ClientConnection()
    client.receive_data(
        HELLO_REPLY.layout.pack(0x4E424C48, 1, 0, SIZE, BLOCK_SIZE, MAX_PAYLOAD, 0, 16)
    )
    client.next_event()
    client.receive_data(encode_reply(42, Errno.OK))
    with pytest.raises(ProtocolError, match="unknown handle"):
        client.next_event()


def test_client_refuses_invalid_hello_arguments() -> None:
    with pytest.raises(ValueError, match="export name"):
        ClientConnection().send_hello("bad/name", TOKEN)
    with pytest.raises(ValueError, match="token"):
        ClientConnection().send_hello("data", b"x")


# --- fuzzing -----------------------------------------------------------------


def drain(conn: ServerConnection) -> None:
    """Pull events until NEED_DATA; only ProtocolError may escape."""
    for _ in range(10_000):
        event = conn.next_event()
        if event is NEED_DATA or isinstance(event, ConnectionClosed | Disconnect):
            return
        if isinstance(event, Request | InvalidRequest):
            conn.send_reply(event.handle, Errno.OK)
        if isinstance(event, Hello):
            conn.accept(ExportGeometry(size=SIZE, flags=ALL_FLAGS))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=64))
def test_fuzz_server_never_fails_except_with_protocol_error(blob: bytes, chunk: int) -> None:
    conn = ServerConnection(scanner_for)
    try:
        for i in range(0, len(blob), chunk):
            conn.receive_data(blob[i : i + chunk])
            drain(conn)
        conn.receive_data(b"")
        drain(conn)
    except ProtocolError as exc:
        assert exc.reason


frames = st.one_of(
    st.builds(
        encode_request,
        st.sampled_from([*list(Cmd), 77]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**20),
        st.integers(0, 2**16 - 1),
    ),
    st.binary(max_size=64),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=20))
def test_fuzz_structured_frames_after_login(stream: list[bytes]) -> None:
    conn = logged_in()
    try:
        conn.receive_data(b"".join(stream))
        drain(conn)
    except ProtocolError as exc:
        assert exc.reason


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]),
    st.integers(0, SIZE // BLOCK_SIZE),
    st.integers(1, 64),
    st.integers(0, 2**64 - 1),
)
def test_fuzz_valid_requests_round_trip(op: Cmd, block: int, blocks: int, handle: int) -> None:
    conn = logged_in()
    offset, length = block * BLOCK_SIZE, blocks * BLOCK_SIZE
    payload = bytes(length) if op is Cmd.WRITE else b""
    (event,) = feed(conn, encode_request(op, handle, offset, length) + payload)
    if offset + length <= SIZE:
        assert event == Request(op, CmdFlag(0), handle, offset, length, payload)
    else:
        assert isinstance(event, InvalidRequest)
        assert event.error in (Errno.INVAL, Errno.NOSPC)


@pytest.mark.parametrize("status", [s for s in LoginStatus if s is not LoginStatus.OK])
def test_a_refused_login_says_nothing_but_its_status(status: LoginStatus) -> None:
    """docs/protocol.md: on any status but OK the size and flag fields are
    zero (block size and max payload too)."""
    server = ServerConnection(scanner_for)
    server.receive_data(encode_hello("data", TOKEN))
    assert isinstance(server.next_event(), Hello)
    magic, version, got, *fields = HELLO_REPLY.layout.unpack(server.refuse(status))
    assert (magic, version) == (HELLO_MAGIC, PROTO_VERSION)
    assert (got, fields) == (status, [0, 0, 0, 0, 0])
