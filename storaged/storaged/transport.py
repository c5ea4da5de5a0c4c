"""A connection's byte channel after the TLS handshake: the kernel's TLS in
both directions where it takes them, OpenSSL in userspace where it does not.

storaged installs the kernel's keys itself, as tls-bridge does for the
driver, because OpenSSL 3.0 hands the kernel TLS 1.3 sending only: with
receiving in the kernel too, one ``recvmsg`` returns every request record
queued, where OpenSSL opens one record per call (two ``read`` calls each).

Python's ``ssl`` reports traffic secrets only through a context's key log
file, and a line there does not say which connection it belongs to.  So
each handshake in progress has a context to itself, whose key log is a
memfd; contexts are lent out and reused, since making one (loading the
certificate files) costs about as much as a handshake.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import queue
import socket
import ssl
import struct
import termios
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from netblk.ktls import (
    ALERT,
    ALERT_NAMES,
    APPLICATION_DATA,
    CIPHERS,
    CLOSE_NOTIFY,
    HANDSHAKE,
    KeyLog,
    KtlsKeys,
    install,
    ktls_keys,
    receive,
)
from netblk.tlsconf import (
    SOL_TLS,
    TLS_RX_EXPECT_NO_PAD,
    TLS_SET_RECORD_TYPE,
    kernel_tls_directions,
    peer_common_name,
    server_context,
)

#: Bytes asked of the socket per receive.
READ_CHUNK = 256 << 10
#: Idle key-logged contexts kept for the next handshakes; more are made
#: while more handshakes run at once, and dropped when they end.
MAX_IDLE_CONTEXTS = 4
#: A warning-level close_notify alert (RFC 8446 6.1).
_CLOSE_NOTIFY_ALERT = bytes((1, CLOSE_NOTIFY))
_INT = struct.Struct("i")


class Channel(Protocol):
    """Application data to and from a logged-in peer.

    ``recv`` blocks for at least one record (the timeout applies), then also
    takes what is already queued, up to READ_CHUNK; b"" at EOF.  Raises
    OSError (a TLS failure is an ``ssl.SSLError`` or a
    ``ConnectionAbortedError``).
    """

    #: The client certificate's common name.
    identity: str | None

    def fileno(self) -> int: ...

    def buffered(self) -> bool:
        """Whether received data waits in userspace, where poll cannot see it."""
        ...

    def recv(self) -> bytes: ...

    def sendall(self, data: bytes) -> None: ...

    def settimeout(self, timeout: float | None) -> None: ...

    def kernel_tls(self) -> str:
        """Which directions the kernel seals or opens (``tlsconf.kernel_tls_directions``)."""
        ...

    def close(self) -> None:
        """Send close_notify without waiting, then close this channel's descriptor."""
        ...


#: Puts a handshaken socket's record layer in the kernel; raises OSError.
Installer = Callable[[socket.socket, KtlsKeys, str | None], Channel]


class _SocketChannel:
    """What both channels do the same way, on the socket they hold."""

    def __init__(self, sock: socket.socket, identity: str | None) -> None:
        self._sock = sock
        self.identity = identity

    def fileno(self) -> int:
        return self._sock.fileno()

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def kernel_tls(self) -> str:
        return kernel_tls_directions(self._sock)


class OpenSslChannel(_SocketChannel):
    """TLS records sealed and opened by OpenSSL (``tls.kernel_tls = false``,
    or a kernel without the ``tls`` module)."""

    _sock: ssl.SSLSocket

    def __init__(self, sock: ssl.SSLSocket) -> None:
        super().__init__(sock, peer_common_name(sock.getpeercert()))

    def buffered(self) -> bool:
        return self._sock.pending() > 0

    def recv(self) -> bytes:
        sock = self._sock
        data = sock.recv(READ_CHUNK)
        # One recv returns one TLS record; take the records already queued
        # too, so that the requests they carry are answered as one batch.
        # Asking the kernel first spares a lone request (queue depth 1) a
        # failing non-blocking read and two mode switches.
        if not data or len(data) >= READ_CHUNK or not self._bytes_queued():
            return data
        chunks = [data]
        received = len(data)
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            while received < READ_CHUNK and (data := sock.recv(READ_CHUNK - received)):
                chunks.append(data)
                received += len(data)
        except ssl.SSLWantReadError:
            pass
        finally:
            sock.settimeout(timeout)
        return b"".join(chunks)

    def _bytes_queued(self) -> int:
        """Bytes waiting: decrypted in OpenSSL, or still encrypted in the kernel."""
        if pending := self._sock.pending():
            return pending
        queued = fcntl.ioctl(self._sock.fileno(), termios.FIONREAD, bytes(_INT.size))
        return int(_INT.unpack(queued)[0])

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._sock.setblocking(False)
            self._sock.unwrap().close()
        self._sock.close()


class KernelTlsChannel(_SocketChannel):
    """Plain socket calls; the kernel seals and opens the records."""

    def buffered(self) -> bool:
        return False

    def recv(self) -> bytes:
        content_type, data = receive(self._sock, READ_CHUNK)
        if content_type != APPLICATION_DATA:
            return _control_record(content_type, data)
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendmsg(
                [_CLOSE_NOTIFY_ALERT],
                [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes((ALERT,)))],
                socket.MSG_DONTWAIT,
            )
        self._sock.close()


def _control_record(content_type: int, body: bytes) -> bytes:
    """What a non-data record from the client means: b"" (EOF) for
    close_notify, else ConnectionAbortedError."""
    if content_type == ALERT and len(body) >= 2:
        if body[1] == CLOSE_NOTIFY:
            return b""
        name = ALERT_NAMES.get(body[1], f"number {body[1]}")
        raise ConnectionAbortedError(f"client sent TLS alert {name}")
    if content_type == HANDSHAKE:
        raise ConnectionAbortedError(
            "client sent a TLS handshake message after the handshake (a KeyUpdate?),"
            " which the kernel's TLS cannot take"
        )
    raise ConnectionAbortedError(f"client sent an unexpected TLS record (type {content_type})")


def install_kernel_tls(sock: socket.socket, keys: KtlsKeys, identity: str | None) -> Channel:
    install(sock, keys)
    # netblk's clients never pad records, so the kernel may decrypt a TLS
    # 1.3 record straight into recvmsg's buffer; a padded one still works
    # (decrypted again the slow way).  Linux >= 6.0; older ones just copy.
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD, 1)
    return KernelTlsChannel(sock, identity)


class _KeyLoggedContext:
    """A server context whose key log (a memfd) only it writes to."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self._log = os.memfd_create("storaged-keylog", os.MFD_CLOEXEC)
        try:
            context.keylog_filename = f"/proc/self/fd/{self._log}"
        except OSError:
            os.close(self._log)
            raise

    def secrets(self) -> tuple[bytes, bytes] | None:
        """(client, server) traffic secrets of the handshake that just ran."""
        chunks = []
        offset = 0
        while chunk := os.pread(self._log, 4096, offset):
            chunks.append(chunk)
            offset += len(chunk)
        keylog = KeyLog()
        for line in b"".join(chunks).splitlines():
            keylog.feed(line)
        return keylog.secrets()

    def clear(self) -> None:
        """Forget the log.  It is opened for appending, so the next
        handshake writes from the start again."""
        os.ftruncate(self._log, 0)

    def close(self) -> None:
        os.close(self._log)


class ServerTls:
    """storaged's side of the TLS handshake, and the channel after it.

    With ``kernel_tls``, the kernel takes both directions where it can
    (the ``tls`` module loaded, a cipher it knows); otherwise OpenSSL keeps
    the record layer.  Raises OSError (``ssl.SSLError``) if the certificate
    files cannot be loaded.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        ca: Path,
        *,
        kernel_tls: bool,
        installer: Installer = install_kernel_tls,
    ) -> None:
        self._make_context = functools.partial(server_context, cert, key, ca)
        self._installer = installer
        self._idle: queue.SimpleQueue[_KeyLoggedContext] = queue.SimpleQueue()
        # Made now, so that unreadable certificate files (or no /proc for
        # the key log) stop storaged at startup.
        first = self._make_context()
        self._userspace_only = None if kernel_tls else first
        if kernel_tls:
            self._idle.put(_KeyLoggedContext(first))

    def handshake(self, sock: socket.socket) -> Channel:
        """Run the server handshake on ``sock`` (its timeout applies).

        The channel works on a duplicate of ``sock``'s descriptor or on
        ``sock`` itself, so ``sock`` stays valid for shutdown() from other
        threads, and the caller closes it after the channel.  Raises OSError.
        """
        if self._userspace_only is not None:
            return OpenSslChannel(self._handshake(self._userspace_only, sock))
        with self._lent() as logged:
            tls_sock = self._handshake(logged.context, sock)
            secrets = logged.secrets()
        cipher = CIPHERS.get((tls_sock.cipher() or ("",))[0])
        if secrets is None or cipher is None or tls_sock.pending():
            return OpenSslChannel(tls_sock)
        keys = ktls_keys(cipher, tx_secret=secrets[1], rx_secret=secrets[0])
        identity = peer_common_name(tls_sock.getpeercert())
        try:
            channel = self._installer(sock, keys, identity)
        except OSError:
            if kernel_tls_directions(sock) != "none":
                raise  # half installed: neither side can carry on
            return OpenSslChannel(tls_sock)
        tls_sock.close()  # the duplicate; OpenSSL has nothing left to do
        return channel

    @staticmethod
    def _handshake(context: ssl.SSLContext, sock: socket.socket) -> ssl.SSLSocket:
        duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        duplicate.settimeout(sock.gettimeout())
        tls_sock = context.wrap_socket(duplicate, server_side=True, do_handshake_on_connect=False)
        try:
            tls_sock.do_handshake()
        except BaseException:
            tls_sock.close()
            raise
        return tls_sock

    @contextlib.contextmanager
    def _lent(self) -> Iterator[_KeyLoggedContext]:
        try:
            logged = self._idle.get_nowait()
        except queue.Empty:
            logged = _KeyLoggedContext(self._make_context())
        try:
            yield logged
        finally:
            logged.clear()
            if self._idle.qsize() < MAX_IDLE_CONTEXTS:
                self._idle.put(logged)
            else:
                logged.close()
