"""Misbehaving TLS servers for failure tests, each a few lines of Python
ssl on a thread: wrong certificates, tickets, hang-ups, old TLS versions."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from netblk.tlsconf import server_context
from tests.pki_fixtures import PkiFiles
from tests.tls_bridge.support import LOOPBACK


@contextlib.contextmanager
def fake_server(
    serve: Callable[[socket.socket], None],
) -> Iterator[int]:
    """Accept one connection on loopback and run ``serve`` on it."""
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            serve(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        listener.close()
        thread.join(timeout=10)


def tls_server(
    pki: PkiFiles,
    after_handshake: Callable[[ssl.SSLSocket], None],
    *,
    tickets: int = 0,
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    cert: tuple[Path, Path] | None = None,
) -> Callable[[socket.socket], None]:
    cert_path, key_path = cert or (pki.server_cert, pki.server_key)
    context = server_context(cert_path, key_path, pki.ca_cert)
    context.num_tickets = tickets
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = max_version

    def serve(conn: socket.socket) -> None:
        conn.settimeout(10)
        with context.wrap_socket(conn, server_side=True) as tls:
            after_handshake(tls)

    return serve


def read_hello_then(action: Callable[[ssl.SSLSocket], None]) -> Callable[[ssl.SSLSocket], None]:
    def handle(tls: ssl.SSLSocket) -> None:
        tls.recv(4096)
        action(tls)

    return handle
