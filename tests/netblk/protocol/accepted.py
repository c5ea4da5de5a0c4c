"""A server codec past its HELLO, where protocol tests start.

The codec takes its request scanner from the server that uses it; these
tests give it storaged's engine, the scanner storaged runs."""

from __future__ import annotations

from netblk.protocol.codec import (
    ExportGeometry,
    Hello,
    ScannerFactory,
    ServerConnection,
    encode_hello,
)
from netblk.protocol.constants import ExportFlag
from storaged.session import scanner_for

TOKEN = b"t" * 32
#: Every optional operation offered.
ALL_FLAGS = (
    ExportFlag.SEND_FLUSH
    | ExportFlag.SEND_FUA
    | ExportFlag.SEND_TRIM
    | ExportFlag.SEND_WRITE_ZEROES
)


def accepted(geometry: ExportGeometry, scanner: ScannerFactory = scanner_for) -> ServerConnection:
    """A codec that took a client's HELLO for export "data" and accepted it."""
    conn = ServerConnection(scanner)
    conn.receive_data(encode_hello("data", TOKEN))
    assert conn.next_event() == Hello(version=1, export="data", token=TOKEN)
    conn.accept(geometry)
    return conn
