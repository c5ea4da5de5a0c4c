"""TLS settings shared by storaged and its client library.

TLS 1.3 only; the server demands a client certificate from the netblk CA and
sends no session tickets, because a kTLS peer cannot take post-handshake
messages (docs/protocol.md, "Transport").  The Linux kTLS socket options live
here too: tls-bridge and storaged install keys with them (``netblk.ktls``).
"""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path
from typing import Any

# Socket options (include/uapi/linux/tls.h, include/uapi/linux/tcp.h).
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TLS_RX_EXPECT_NO_PAD = 4  # the peer never pads records (TLS 1.3; Linux >= 6.0)
TLS_SET_RECORD_TYPE = 1  # cmsg type giving a sent record's content type
TLS_GET_RECORD_TYPE = 2  # cmsg type carrying a received record's content type
TCP_ULP = 31
#: struct tls_crypto_info (version, cipher type: host-endian __u16s), the head
#: of every TLS_TX/TLS_RX argument.
CRYPTO_INFO_HEADER = struct.Struct("=HH")


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """storaged's context (``transport.ServerTls`` puts the record layer in
    the kernel after the handshake where it can)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.num_tickets = 0
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=ca)
    return context


def kernel_tls_directions(sock: socket.socket) -> str:
    """Which directions of a connection the kernel's TLS seals or opens:
    ``"tx"``, ``"rx"``, ``"tx+rx"`` or ``"none"``."""
    directions = []
    for name, option in (("tx", TLS_TX), ("rx", TLS_RX)):
        try:  # just the header: says the direction is installed, copies no key
            sock.getsockopt(SOL_TLS, option, CRYPTO_INFO_HEADER.size)
        except OSError:  # no tls ULP (ENOPROTOOPT), or not installed (EBUSY)
            continue
        directions.append(name)
    return "+".join(directions) or "none"


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def peer_common_name(peercert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (the client identity)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName":
                return str(value)
    return None


def describe_tls_error(exc: BaseException) -> str:
    """An operator-readable reason for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()  # PEER_DID_NOT_RETURN_A_CERTIFICATE
    if isinstance(exc, ssl.SSLError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return str(exc) or type(exc).__name__
