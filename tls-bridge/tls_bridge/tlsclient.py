"""The TLS 1.3 client handshake on the kernel's socket, with pyOpenSSL.

Mutual TLS: we present the client certificate and verify the server's
against the configured CA *and* name (DNS name or IP address).  The name is
checked in the verify callback, so a wrong server is refused before we send
our certificate.  OpenSSL's key log hands us the application traffic
secrets, which become the kTLS keys.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL, crypto

from netblk.ktls import ALERT_NAMES, CIPHERS, KeyLog, KtlsKeys, ktls_keys
from tls_bridge.config import ServerEntry, is_ip_literal
from tls_bridge.errors import Deadline, Failure

ALERT_CODES = {name: code for code, name in ALERT_NAMES.items()}

_Codes = SSL.X509VerificationCodes
#: What a failed OpenSSL check means, in operator terms.
VERIFY_ERRORS = {
    _Codes.ERR_CERT_HAS_EXPIRED: "has expired",
    _Codes.ERR_CERT_NOT_YET_VALID: "is not valid yet",
    _Codes.ERR_UNABLE_TO_GET_ISSUER_CERT: "is not signed by the configured CA",
    _Codes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "is not signed by the configured CA",
    _Codes.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: "is not signed by the configured CA",
    _Codes.ERR_CERT_SIGNATURE_FAILURE: "has a signature the configured CA did not make",
    _Codes.ERR_DEPTH_ZERO_SELF_SIGNED_CERT: "is self-signed",
    _Codes.ERR_SELF_SIGNED_CERT_IN_CHAIN: "ends at a root other than the configured CA",
    _Codes.ERR_INVALID_CA: "was issued by a certificate that is not a CA",
    _Codes.ERR_INVALID_PURPOSE: "is not meant for TLS servers (extended key usage)",
}


def names_in(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in the certificate's SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return san.get_values_for_type(x509.DNSName) + ips


def name_matches(cert: x509.Certificate, expected: str) -> bool:
    """Whether the certificate's SAN names ``expected`` (RFC 6125, no CN fallback)."""
    try:
        wanted_ip = ipaddress.ip_address(expected)
    except ValueError:
        return any(_dns_match(pattern, expected) for pattern in names_in(cert))
    return any(_ip_equal(name, wanted_ip) for name in names_in(cert))


def _ip_equal(name: str, wanted: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(name) == wanted
    except ValueError:
        return False


def _dns_match(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        # A wildcard stands for exactly one whole leftmost label.
        head, _, tail = name.partition(".")
        return bool(head) and tail == pattern[2:]
    return pattern == name


class ServerCheck:
    """pyOpenSSL verify callback: OpenSSL checks the chain, we check the name.

    The first problem is kept in ``failure`` for the operator-facing reason,
    since OpenSSL itself only says "certificate verify failed".
    """

    def __init__(self, expected_name: str) -> None:
        self.expected_name = expected_name
        self.failure: str | None = None

    def __call__(
        self, _conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            what = VERIFY_ERRORS.get(code, f"failed verification (OpenSSL error {code})")
            subject = "server certificate" + (f" chain (depth {depth})" if depth else "")
            self._fail(f"{subject} {what}")
            return False
        if depth == 0 and not name_matches(cert.to_cryptography(), self.expected_name):
            names = ", ".join(names_in(cert.to_cryptography())) or "nothing"
            self._fail(f"server certificate is for {names}, not {self.expected_name}")
            return False
        return True

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason


def client_context(server: ServerEntry, keylog: KeyLog) -> SSL.Context:
    """A fresh context per handshake, so renewed certificate files apply at once."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_tls13_ciphersuites(":".join(server.ciphersuites).encode())
    context.set_keylog_callback(lambda _conn, line: keylog.feed(line))
    _load("CA", server.ca, lambda: context.load_verify_locations(str(server.ca)))
    _load(
        "client certificate",
        server.cert,
        lambda: context.use_certificate_chain_file(str(server.cert)),
    )
    _load("client key", server.key, lambda: context.use_privatekey_file(str(server.key)))
    _load("client key", server.key, context.check_privatekey)
    return context


def _load(what: str, path: Path, load: Callable[[], object]) -> None:
    try:
        load()
    except (SSL.Error, OSError) as exc:
        raise Failure(errno.ENOKEY, f"cannot load {what} {path}: {_ssl_reason(exc)}") from None


@dataclass(frozen=True)
class Handshake:
    """A finished client handshake: the kTLS keys, and OpenSSL's connection
    (still needed to read a refusal the server sent right after it)."""

    keys: KtlsKeys
    conn: SSL.Connection


def tls_handshake(sock: socket.socket, server: ServerEntry, deadline: Deadline) -> Handshake:
    """Run the client handshake on ``sock``; return the keys for kTLS.

    Raises Failure.  On return OpenSSL holds no unread bytes, so the next
    record on the socket is the server's first application record, which
    kTLS will read with sequence number 0.
    """
    keylog = KeyLog()
    check = ServerCheck(server.verify_name)
    conn = SSL.Connection(client_context(server, keylog), sock)
    conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, check)
    if server.server_name is not None and not is_ip_literal(server.server_name):
        conn.set_tlsext_host_name(server.server_name.encode("ascii"))
    conn.set_connect_state()
    sock.setblocking(False)  # each wait below is bounded by the deadline
    while True:
        try:
            conn.do_handshake()
            break
        except SSL.WantReadError:
            _wait(sock, select.POLLIN, deadline)
        except SSL.WantWriteError:
            _wait(sock, select.POLLOUT, deadline)
        except SSL.Error as exc:
            raise _handshake_failure(exc, check) from None

    cipher = CIPHERS.get(conn.get_cipher_name() or "")
    if cipher is None:
        raise Failure(errno.EPROTO, f"negotiated {conn.get_cipher_name()}, which kTLS cannot take")
    if conn.pending():
        raise Failure(errno.EPROTO, "server sent data during the handshake; kTLS would lose it")
    secrets = keylog.secrets()
    if secrets is None:
        raise Failure(errno.EPROTO, "OpenSSL did not report the traffic secrets")
    return Handshake(ktls_keys(cipher, *secrets), conn)


def alert_after_handshake(conn: SSL.Connection) -> int | None:
    """The alert code the server already sent after the handshake, if any.

    A TLS 1.3 client finishes its handshake before the server has judged its
    certificate, so a refusal (alert, then close) can beat the kTLS install.
    """
    try:
        conn.recv(1)
    except SSL.WantReadError:
        return None
    except SSL.Error as exc:  # "tlsv1 alert unknown ca" -> unknown_ca
        _, found, description = _ssl_reason(exc).partition("alert ")
        return ALERT_CODES.get(description.replace(" ", "_")) if found else None
    except OSError:
        return None
    return None


def _wait(sock: socket.socket, event: int, deadline: Deadline) -> None:
    poller = select.poll()
    poller.register(sock, event)
    if not poller.poll(deadline.remaining("TLS handshake") * 1000):
        raise deadline.expired("TLS handshake")


def _handshake_failure(exc: SSL.Error, check: ServerCheck) -> Failure:
    if check.failure is not None:
        return Failure(errno.EACCES, check.failure)
    if isinstance(exc, SSL.SysCallError):
        code, _message = exc.args
        if code > 0:
            return Failure(code, f"TLS handshake: {os.strerror(code)}")
        return Failure(errno.ECONNRESET, "server closed the connection during the TLS handshake")
    return Failure(errno.EPROTO, f"TLS handshake failed: {_ssl_reason(exc)}")


def _ssl_reason(exc: Exception) -> str:
    """OpenSSL's reason strings ("tlsv1 alert protocol version"), or the OS error."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(entry[-1]) for entry in errors if entry and entry[-1]]
    return "; ".join(reasons) or str(exc) or type(exc).__name__
