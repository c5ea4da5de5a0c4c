"""TLS settings shared by storaged and its client library.

TLS 1.3 only; the server demands a client certificate from the netblk CA and
sends no session tickets, because a kTLS peer cannot take post-handshake
messages (docs/protocol.md, "Transport").
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.num_tickets = 0
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=ca)
    return context


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
