"""A server codec past its HELLO, where protocol tests start."""

from __future__ import annotations

from netblk.protocol.codec import ExportGeometry, Hello, ServerConnection, encode_hello
from netblk.protocol.constants import ExportFlag

TOKEN = b"t" * 32
#: Every optional operation offered.
ALL_FLAGS = (
    ExportFlag.SEND_FLUSH
    | ExportFlag.SEND_FUA
    | ExportFlag.SEND_TRIM
    | ExportFlag.SEND_WRITE_ZEROES
)


def accepted(geometry: ExportGeometry) -> ServerConnection:
    """A codec that took a client's HELLO for export "data" and accepted it."""
    conn = ServerConnection()
    conn.receive_data(encode_hello("data", TOKEN))
    assert conn.next_event() == Hello(version=1, export="data", token=TOKEN)
    conn.accept(geometry)
    return conn
