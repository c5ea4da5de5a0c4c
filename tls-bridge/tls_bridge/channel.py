"""The byte channel after the handshake: kernel TLS on the same socket.

``install_ktls`` hands the record layer to the kernel; from then on plain
send/recv carry plaintext and the kernel encrypts.  Non-data records (an
alert, a stray session ticket) arrive as ancillary data and become clear
failures instead of a bare EIO.  ``RecordChannel`` is the seam that lets host
tests, which have no kTLS, run the same login over a userspace record layer.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Protocol

from netblk.ktls import (
    ALERT,
    ALERT_NAMES,
    APPLICATION_DATA,
    HANDSHAKE,
    KtlsKeys,
    install,
    receive,
)
from tls_bridge.errors import Failure

#: Alerts by which a TLS 1.3 server refuses our certificate; it can only do
#: so after our side of the handshake is complete, so they show up here.
CERTIFICATE_ALERTS = frozenset({42, 43, 44, 45, 46, 48, 49, 116})


class RecordChannel(Protocol):
    """Application data over the secured socket (the socket's timeout applies)."""

    def send(self, data: bytes) -> None: ...

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of application data; b"" at EOF; Failure on
        any other record."""
        ...


Installer = Callable[[socket.socket, KtlsKeys], RecordChannel]


def unexpected_record(content_type: int, body: bytes) -> Failure:
    """The failure a non-application-data record after the handshake means."""
    if content_type == ALERT and len(body) >= 2:
        code = body[1]
        name = ALERT_NAMES.get(code, f"number {code}")
        if code in CERTIFICATE_ALERTS:
            return Failure(errno.EACCES, f"server refused our client certificate: TLS alert {name}")
        if code == 0:
            return Failure(errno.ECONNRESET, "server ended the TLS session before answering HELLO")
        return Failure(errno.EPROTO, f"server sent TLS alert {name}")
    if content_type == HANDSHAKE:
        # kTLS cannot process handshake messages; docs/protocol.md forbids them.
        return Failure(
            errno.EPROTO,
            "server sent a post-handshake message (session ticket?); it must send none",
        )
    return Failure(errno.EPROTO, f"server sent an unexpected TLS record (type {content_type})")


class KtlsChannel:
    """Plain socket I/O once the kernel owns the TLS record layer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def recv(self, size: int) -> bytes:
        content_type, data = receive(self._sock, size)
        if content_type != APPLICATION_DATA:
            raise unexpected_record(content_type, data)
        return data


def install_ktls(sock: socket.socket, keys: KtlsKeys) -> KtlsChannel:
    """Hand the record layer to the kernel (``netblk.ktls.install``)."""
    install(sock, keys)
    return KtlsChannel(sock)
