"""Kernel TLS for both ends of a netblk connection: the tail of the TLS 1.3
key schedule, ``crypto_info``, and installing it on a socket.

tls-bridge installs keys for the driver's end, storaged for its own.
OpenSSL reports the application traffic secrets through its key log; RFC
8446 section 7.3 turns a secret into a record key and IV; the kernel takes
them as ``struct tls12_crypto_info_*`` from include/uapi/linux/tls.h
(despite the name, also for TLS 1.3).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from netblk.tlsconf import (
    CRYPTO_INFO_HEADER,
    SOL_TLS,
    TCP_ULP,
    TLS_GET_RECORD_TYPE,
    TLS_RX,
    TLS_TX,
)

TLS_1_3_VERSION = 0x0304

#: TLS 1.3 per-record nonce length (RFC 8446 5.3), the same for every AEAD here.
NONCE_LEN = 12
REC_SEQ_LEN = 8
#: Keys are installed right after the handshake, before any application
#: record in either direction, so both sequence numbers start at zero.
REC_SEQ_START = bytes(REC_SEQ_LEN)

# Key log labels of the first application traffic secrets (NSS key log format).
CLIENT_TRAFFIC_SECRET = "CLIENT_TRAFFIC_SECRET_0"  # noqa: S105 - a label, not a secret
SERVER_TRAFFIC_SECRET = "SERVER_TRAFFIC_SECRET_0"  # noqa: S105

# TLS record content types (RFC 8446 5.1).
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
#: The alert that ends a TLS session cleanly (RFC 8446 6.1).
CLOSE_NOTIFY = 0

#: Alert descriptions (RFC 8446 6) a netblk peer plausibly sends.
ALERT_NAMES = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    80: "internal_error",
    109: "missing_extension",
    116: "certificate_required",
}


@dataclass(frozen=True)
class KtlsCipher:
    """A TLS 1.3 cipher suite the kernel can take over.

    kTLS splits the 12-byte TLS 1.3 IV into ``salt`` (its first ``salt_len``
    bytes) and ``iv`` (the rest); ChaCha20-Poly1305 has no salt.
    """

    name: str
    cipher_type: int
    hash: hashes.HashAlgorithm
    key_len: int
    salt_len: int

    @property
    def info_size(self) -> int:
        """sizeof the matching ``struct tls12_crypto_info_*``."""
        return CRYPTO_INFO_HEADER.size + NONCE_LEN + self.key_len + REC_SEQ_LEN


#: Every suite tls-bridge offers, by OpenSSL/IANA name, in preference order.
CIPHERS: Mapping[str, KtlsCipher] = {
    cipher.name: cipher
    for cipher in (
        KtlsCipher("TLS_AES_256_GCM_SHA384", 52, hashes.SHA384(), 32, 4),
        KtlsCipher("TLS_AES_128_GCM_SHA256", 51, hashes.SHA256(), 16, 4),
        KtlsCipher("TLS_CHACHA20_POLY1305_SHA256", 54, hashes.SHA256(), 32, 0),
    )
}


def hkdf_expand_label(
    algorithm: hashes.HashAlgorithm, secret: bytes, label: str, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 section 7.1)."""
    full_label = b"tls13 " + label.encode("ascii")
    info = struct.pack(">HB", length, len(full_label)) + full_label
    info += struct.pack(">B", len(context)) + context
    return HKDFExpand(algorithm, length, info).derive(secret)


def traffic_key_iv(cipher: KtlsCipher, secret: bytes) -> tuple[bytes, bytes]:
    """The record key and IV of one direction (RFC 8446 section 7.3)."""
    key = hkdf_expand_label(cipher.hash, secret, "key", b"", cipher.key_len)
    iv = hkdf_expand_label(cipher.hash, secret, "iv", b"", NONCE_LEN)
    return key, iv


def crypto_info(cipher: KtlsCipher, secret: bytes) -> bytes:
    """The setsockopt(SOL_TLS, TLS_TX/TLS_RX) argument for one direction."""
    key, iv = traffic_key_iv(cipher, secret)
    salt, explicit_iv = iv[: cipher.salt_len], iv[cipher.salt_len :]
    header = CRYPTO_INFO_HEADER.pack(TLS_1_3_VERSION, cipher.cipher_type)
    return header + explicit_iv + key + salt + REC_SEQ_START


@dataclass(frozen=True)
class KtlsKeys:
    """Both directions' ``crypto_info``: a client sends with the client
    secret, a server with the server secret."""

    cipher: KtlsCipher
    tx: bytes = field(repr=False)  # key material: never in a log or a traceback
    rx: bytes = field(repr=False)


def ktls_keys(cipher: KtlsCipher, tx_secret: bytes, rx_secret: bytes) -> KtlsKeys:
    return KtlsKeys(cipher, crypto_info(cipher, tx_secret), crypto_info(cipher, rx_secret))


def install(sock: socket.socket, keys: KtlsKeys) -> None:
    """Attach the "tls" ULP and install both directions' keys.

    Receiving goes first: if the kernel refuses it (the cipher, say),
    nothing is installed yet and the caller can still carry on in userspace.
    Raises OSError.
    """
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    sock.setsockopt(SOL_TLS, TLS_RX, keys.rx)
    sock.setsockopt(SOL_TLS, TLS_TX, keys.tx)


def receive(sock: socket.socket, size: int) -> tuple[int, bytes]:
    """(content type, data) of what a kTLS socket returns: every data record
    queued, up to ``size`` bytes, or one record of another type alone.

    With room for the control message, kTLS reports a non-data record's type
    instead of failing the read with a bare EIO.  Raises OSError.
    """
    data, ancillary, _flags, _address = sock.recvmsg(size, socket.CMSG_SPACE(1))
    for level, kind, value in ancillary:
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE:
            return value[0], data
    return APPLICATION_DATA, data


class KeyLog:
    """Collects traffic secrets from OpenSSL's key log callback lines.

    A line is ``LABEL <client random hex> <secret hex>``; only the two
    application secrets are kept.
    """

    WANTED = frozenset({CLIENT_TRAFFIC_SECRET, SERVER_TRAFFIC_SECRET})

    def __init__(self) -> None:
        self._secrets: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"KeyLog(labels={sorted(self._secrets)})"

    def feed(self, line: bytes) -> None:
        parts = line.decode("ascii", "replace").split()
        if len(parts) == 3 and parts[0] in self.WANTED:
            self._secrets[parts[0]] = bytes.fromhex(parts[2])

    def secrets(self) -> tuple[bytes, bytes] | None:
        """(client, server) application traffic secrets, once both were logged."""
        client = self._secrets.get(CLIENT_TRAFFIC_SECRET)
        server = self._secrets.get(SERVER_TRAFFIC_SECRET)
        return None if client is None or server is None else (client, server)
