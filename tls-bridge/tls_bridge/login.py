"""One upcall's work: TLS handshake, kTLS keys, netblk login, on a socket.

``handshake_and_login`` takes the socket the kernel handed over and the
config entry for its server and returns a ``LoginResult``; every failure
becomes an errno plus an operator-readable reason, never an exception.
The caller keeps owning the socket.
"""

from __future__ import annotations

import errno
import fcntl
import socket
from dataclasses import dataclass

from netblk.ktls import ALERT
from netblk.protocol.codec import (
    ClientConnection,
    ExportGeometry,
    HelloReply,
    NeedData,
    ProtocolError,
)
from netblk.protocol.constants import (
    BLOCK_SIZE,
    HELLO_REPLY,
    MAX_PAYLOAD,
    PROTO_VERSION,
    LoginStatus,
)
from tls_bridge.channel import Installer, RecordChannel, install_ktls, unexpected_record
from tls_bridge.config import ServerEntry, read_token
from tls_bridge.errors import Deadline, Failure
from tls_bridge.tlsclient import Handshake, alert_after_handshake, tls_handshake

#: TLS alert level "fatal" (RFC 8446, section 6).
ALERT_LEVEL_FATAL = 2

#: Each refused login: the errno for the kernel and what it means.
LOGIN_FAILURES: dict[LoginStatus, tuple[int, str]] = {
    LoginStatus.BAD_VERSION: (errno.EPROTO, f"server does not speak version {PROTO_VERSION}"),
    LoginStatus.BAD_REQUEST: (errno.EPROTO, "server found our HELLO malformed"),
    LoginStatus.DENIED: (errno.EACCES, "client certificate identity or token not accepted"),
    LoginStatus.NO_EXPORT: (errno.ENOENT, "no such export"),
    LoginStatus.FORBIDDEN: (errno.EACCES, "this client has no rights on the export"),
    LoginStatus.RATE_LIMITED: (errno.EAGAIN, "too many failed logins, retry later"),
    LoginStatus.UNAVAILABLE: (errno.EAGAIN, "server cannot serve the export now"),
}


@dataclass(frozen=True)
class LoginResult:
    """``status`` 0 with the export's geometry, or a positive errno and why."""

    status: int
    reason: str = ""
    cipher: str | None = None
    geometry: ExportGeometry | None = None


def handshake_and_login(
    sock: socket.socket,
    server: ServerEntry,
    export: str,
    timeout: float,
    install: Installer = install_ktls,
) -> LoginResult:
    """TLS 1.3 + kTLS + HELLO on ``sock`` within ``timeout`` seconds.

    ``install`` puts the record layer in place after the handshake; only host
    tests (no kTLS there) pass anything but ``install_ktls``.
    """
    deadline = Deadline(timeout)
    cipher = None
    file_flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    try:
        try:
            token = read_token(server.token_file)
        except OSError as exc:
            raise Failure(errno.ENOKEY, f"token file {exc.filename}: {exc.strerror}") from None
        except ValueError as exc:
            raise Failure(errno.ENOKEY, str(exc)) from None
        handshake = tls_handshake(sock, server, deadline)
        cipher = handshake.keys.cipher.name
        try:
            channel = install(sock, handshake.keys)
        except OSError as exc:
            raise _install_failure(exc, handshake) from None
        geometry = login(channel, sock, export, token, deadline)
    except Failure as failure:
        return LoginResult(failure.code, failure.reason, cipher)
    finally:
        # Timeouts toggled O_NONBLOCK; hand the socket back as the kernel made it.
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, file_flags)
    return LoginResult(0, "", cipher, geometry)


def _install_failure(exc: OSError, handshake: Handshake) -> Failure:
    """Why kTLS could not be set up: the server's refusal if it already
    sent one (the socket is then closed: ENOTCONN), else the OS error."""
    if exc.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
        alert = alert_after_handshake(handshake.conn)
        if alert is not None:
            return unexpected_record(ALERT, bytes([ALERT_LEVEL_FATAL, alert]))
    hint = " (is the tls module loaded?)" if exc.errno == errno.ENOENT else ""
    return Failure(exc.errno or errno.EIO, f"kTLS setup: {exc.strerror}{hint}")


def login(
    channel: RecordChannel, sock: socket.socket, export: str, token: bytes, deadline: Deadline
) -> ExportGeometry:
    """Send HELLO, read exactly the HELLO reply, return what it grants.

    Not a byte past the reply is read: what follows belongs to the kernel.
    """
    client = ClientConnection()
    try:
        hello = client.send_hello(export, token)
    except ValueError as exc:
        raise Failure(errno.EINVAL, f"cannot log in: {exc}") from None
    step = "login"
    try:
        sock.settimeout(deadline.remaining(step))
        _send_hello(channel, hello)
        received = 0
        while isinstance(event := client.next_event(), NeedData):
            sock.settimeout(deadline.remaining(step))
            data = channel.recv(HELLO_REPLY.size - received)
            received += len(data)
            client.receive_data(data)
    except TimeoutError:
        raise deadline.expired(step) from None
    except ProtocolError as exc:
        raise Failure(errno.EPROTO, f"login: {exc.reason}") from None
    except OSError as exc:
        raise Failure(exc.errno or errno.EIO, f"login: {exc.strerror}") from None
    if not isinstance(event, HelloReply):
        # In TLS 1.3 the server judges our certificate after our handshake
        # is done; a server that then hangs up without an alert looks like this.
        raise Failure(
            errno.ECONNRESET,
            "server closed the connection before answering HELLO"
            " (refused our certificate? see the server's log)",
        )
    return _granted(event, export)


def _send_hello(channel: RecordChannel, hello: bytes) -> None:
    try:
        channel.send(hello)
    except (BrokenPipeError, ConnectionResetError):
        # The server may have refused our certificate and hung up; its alert,
        # if it is still queued, says why better than EPIPE does.
        channel.recv(HELLO_REPLY.size)
        raise


def _granted(reply: HelloReply, export: str) -> ExportGeometry:
    if reply.status is not LoginStatus.OK:
        code, meaning = LOGIN_FAILURES[reply.status]
        if reply.status is LoginStatus.BAD_VERSION:
            meaning += f" (it speaks {reply.version})"
        raise Failure(code, f"login to export {export!r} refused: {reply.status.name}: {meaning}")
    problem = None
    if reply.block_size != BLOCK_SIZE:
        problem = f"block size {reply.block_size}, expected {BLOCK_SIZE}"
    elif reply.export_size % BLOCK_SIZE:
        problem = f"export size {reply.export_size} is not a multiple of {BLOCK_SIZE}"
    elif not BLOCK_SIZE <= reply.max_payload <= MAX_PAYLOAD or reply.max_payload % BLOCK_SIZE:
        problem = f"max payload {reply.max_payload} out of range"
    elif reply.max_inflight < 1:
        problem = "max inflight 0"
    if problem is not None:
        raise Failure(errno.EPROTO, f"bad HELLO reply: {problem}")
    return ExportGeometry(
        size=reply.export_size,
        flags=reply.export_flags,
        max_payload=reply.max_payload,
        max_inflight=reply.max_inflight,
    )
