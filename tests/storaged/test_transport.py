"""Transport guarantees: no post-handshake TLS messages, IPv6, and bounded
in-flight work per connection (backpressure), and the keys storaged hands
the kernel's TLS (checked here through a userspace stand-in for kTLS)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import re
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from netblk.ktls import (
    ALERT,
    CIPHERS,
    CLIENT_TRAFFIC_SECRET,
    HANDSHAKE,
    SERVER_TRAFFIC_SECRET,
    KtlsKeys,
    crypto_info,
)
from netblk.protocol.codec import NEED_DATA, ClientConnection, HelloReply, Reply
from netblk.protocol.constants import BLOCK_SIZE, MAX_PAYLOAD, Cmd, LoginStatus
from netblk.tlsconf import client_context, kernel_tls_directions
from storaged import server as server_module
from storaged import session, transport
from storaged.client import NetblkClient
from storaged.config import load_config
from storaged.server import StorageServer
from storaged.transport import READ_CHUNK, Channel, ServerTls
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import Stack, ThreadedServer, raw_tls_socket, run
from tests.tls_bridge.userspace_tls import UserspaceKtls
from tls_bridge.errors import Failure


def test_server_sends_no_session_tickets(stack: Stack) -> None:
    """A kTLS client cannot consume post-handshake records: after login and
    a read, the client has received no ticket and only application data."""
    with ThreadedServer(stack), raw_tls_socket(stack) as sock:
        conn = ClientConnection()
        sock.sendall(conn.send_hello("data", stack.tokens["alice"].encode()))
        sock.sendall(conn.send_request(Cmd.READ, 1, 0, BLOCK_SIZE))
        events: list[object] = []
        while len(events) < 2:
            conn.receive_data(sock.recv(65536))
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
        assert isinstance(events[0], HelloReply)
        assert events[0].status is LoginStatus.OK
        assert isinstance(events[1], Reply)
        assert sock.version() == "TLSv1.3"
        assert sock.session is not None
        assert not sock.session.has_ticket


def test_a_socket_without_kernel_tls_says_so() -> None:
    """This host has no kTLS: the probe answers "none" instead of failing
    (tests/vm/test_ktls.py sees "tx" where the kernel has it)."""
    with socket.socket() as sock:
        assert kernel_tls_directions(sock) == "none"


def test_ipv6_listener(stack: Stack) -> None:
    async def body() -> None:
        config = replace(load_config(stack.config_path), listen=("::1",))
        server = StorageServer(config)
        await server.open_volumes()
        await server.start()
        try:
            assert server.addresses == [("::1", stack.port)]
            cert, key = stack.client_tls()
            client = await NetblkClient.connect(
                "::1",
                stack.port,
                ssl_context=client_context(stack.pki.ca_cert, cert, key),
                export="data",
                token=stack.tokens["alice"].encode(),
            )
            await client.write(0, b"6" * BLOCK_SIZE)
            assert await client.read(0, BLOCK_SIZE) == b"6" * BLOCK_SIZE
            await client.close()
        finally:
            await server.shutdown()

    run(body())


@pytest.mark.parametrize(
    ("extra", "length", "most_requests", "most_bytes"),
    [
        ("max_inflight = 8", BLOCK_SIZE, 8, None),
        ('max_inflight_bytes = "4MiB"', MAX_PAYLOAD, None, 4 << 20),
    ],
)
def test_in_flight_work_per_connection_is_bounded(
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    extra: str,
    length: int,
    most_requests: int | None,
    most_bytes: int | None,
) -> None:
    """A client pipelines 64 reads past the advertised limit while storage is
    stalled: the server takes in at most the configured number of requests
    (or bytes) before it answers them, the rest wait in TCP, and everything
    completes once storage resumes."""
    text = stack.config_path.read_text().replace("workers = 4", f"workers = 4\n{extra}", 1)
    stack.config_path.write_text(text)
    release = threading.Event()
    batches: list[tuple[int, int]] = []  # (requests, payload bytes) per batch
    real_run = session.run

    def stalled_run(*args: Any) -> Any:
        release.wait(timeout=30)  # storage stalls: no batch is answered
        answer = real_run(*args)
        _consumed, _reply, taken, payload, *_ = answer
        if taken:
            batches.append((taken, payload))
        return answer

    monkeypatch.setattr(session, "run", stalled_run)

    async def body() -> None:
        client = await stack.connect()
        client._slots = asyncio.Semaphore(1000)  # pipeline past the advertised limit
        reads = [asyncio.ensure_future(client.read(i * length, length)) for i in range(64)]
        await asyncio.sleep(2)
        assert not any(r.done() for r in reads)
        release.set()
        assert all(len(data) == length for data in await asyncio.gather(*reads))
        await client.close()

    with ThreadedServer(stack) as ts:
        ts.call(body())
    assert sum(requests for requests, _ in batches) == 64
    if most_requests is not None:
        assert max(requests for requests, _ in batches) == most_requests
    if most_bytes is not None:
        assert max(size for _, size in batches) == most_bytes


# ----------------------------------------------------------------------
# The keys storaged hands the kernel's TLS
# ----------------------------------------------------------------------


class InstallRecorder:
    """An installer that keeps the keys and carries on through the
    userspace stand-in for kTLS (this host has no ``tls`` module)."""

    def __init__(self) -> None:
        self.keys: list[KtlsKeys] = []

    def __call__(self, sock: socket.socket, keys: KtlsKeys, identity: str | None) -> Channel:
        self.keys.append(keys)
        return UserspaceChannel(UserspaceKtls(sock, keys), identity)


class UserspaceChannel:
    """transport.Channel over tests/tls_bridge/userspace_tls.py."""

    def __init__(self, records: UserspaceKtls, identity: str | None) -> None:
        self._records = records
        self.identity = identity

    def fileno(self) -> int:
        return self._records.sock.fileno()

    def buffered(self) -> bool:
        return bool(self._records._plain)

    def recv(self) -> bytes:
        try:
            return self._records.recv(READ_CHUNK)
        except Failure as exc:  # an alert: close_notify ends the stream
            if exc.code == errno.ECONNRESET:
                return b""
            raise ConnectionAbortedError(exc.reason) from None

    def sendall(self, data: bytes) -> None:
        self._records.send(data)

    def settimeout(self, timeout: float | None) -> None:
        self._records.sock.settimeout(timeout)

    def kernel_tls(self) -> str:
        return "stand-in"

    def close(self) -> None:
        self._records.sock.close()


def logged_secrets(keylog: Path) -> dict[str, bytes]:
    """Label -> secret from a client's key log file."""
    return {
        parts[0]: bytes.fromhex(parts[2])
        for parts in (line.split() for line in keylog.read_text().splitlines())
        if len(parts) == 3
    }


def server_handshakes(
    tls: ServerTls, pki: PkiFiles, count: int, tmp_path: Path
) -> list[dict[str, bytes]]:
    """``count`` clients, each with its own key log, handshake with ``tls``
    at the same time and send one record through; the secrets each client
    logged, in the order the server's handshakes finished."""
    logs = tmp_path / f"keylogs-{len(list(tmp_path.glob('keylogs-*')))}"
    logs.mkdir()

    def client(index: int) -> None:
        context = client_context(pki.ca_cert, pki.alice_cert, pki.alice_key)
        context.keylog_filename = str(logs / str(index))
        with context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=30),
            server_hostname="localhost",
        ) as sock:
            sock.sendall(str(index).encode())
            assert sock.recv(16) == b"bye"

    def server() -> tuple[Channel, int]:
        conn, _ = listener.accept()
        conn.settimeout(30)
        channel = tls.handshake(conn)
        index = int(channel.recv())  # the client's first record, opened by our keys
        channel.sendall(b"bye")
        return channel, index

    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(2 * count) as pool:
        port = listener.getsockname()[1]
        servers = [pool.submit(server) for _ in range(count)]
        clients = [pool.submit(client, index) for index in range(count)]
        finished = [future.result(timeout=60) for future in as_completed(servers)]
        for future in clients:
            future.result(timeout=60)
    for channel, _ in finished:
        channel.close()
    return [logged_secrets(logs / str(index)) for _, index in finished]


@pytest.mark.parametrize("at_once", [1, 3])
def test_storaged_installs_each_connections_own_keys(
    pki: PkiFiles, tmp_path: Path, at_once: int
) -> None:
    """Handshakes run side by side; each connection gets the keys of its own
    client's secrets, sending with the server's and receiving with the
    client's, and a record sealed by the client opens with them."""
    recorder = InstallRecorder()
    tls = ServerTls(
        pki.server_cert, pki.server_key, pki.ca_cert, kernel_tls=True, installer=recorder
    )
    secrets = server_handshakes(tls, pki, at_once, tmp_path) + server_handshakes(
        tls, pki, 1, tmp_path
    )
    cipher = CIPHERS["TLS_AES_256_GCM_SHA384"]  # OpenSSL's first choice
    assert len(recorder.keys) == len(secrets) == at_once + 1
    expected = [
        (
            crypto_info(cipher, s[SERVER_TRAFFIC_SECRET]),
            crypto_info(cipher, s[CLIENT_TRAFFIC_SECRET]),
        )
        for s in secrets
    ]
    assert sorted((k.tx, k.rx) for k in recorder.keys) == sorted(expected)


def test_key_logged_contexts_are_reused_and_their_logs_cleared(
    pki: PkiFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[ssl.SSLContext] = []
    real_server_context = transport.server_context

    def counted(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
        made.append(real_server_context(cert, key, ca))
        return made[-1]

    monkeypatch.setattr(transport, "server_context", counted)
    tls = ServerTls(
        pki.server_cert, pki.server_key, pki.ca_cert, kernel_tls=True, installer=InstallRecorder()
    )
    for _ in range(3):
        server_handshakes(tls, pki, 1, tmp_path)
    assert len(made) == 1
    keylog = Path(made[0].keylog_filename)
    assert keylog.read_bytes() == b""  # no secret stays in memory after a handshake
    # As many lent at once as handshakes overlap; each goes back to the
    # idle list while it has room.
    with contextlib.ExitStack() as lent:
        for _ in range(transport.MAX_IDLE_CONTEXTS + 2):
            lent.enter_context(tls._lent())
        assert len(made) == transport.MAX_IDLE_CONTEXTS + 2
    assert tls._idle.qsize() == transport.MAX_IDLE_CONTEXTS
    server_handshakes(tls, pki, 3, tmp_path)  # handshakes on reused contexts
    assert len(made) == transport.MAX_IDLE_CONTEXTS + 2


def test_without_the_kernel_module_openssl_keeps_the_records(pki: PkiFiles, tmp_path: Path) -> None:
    """This host has no ``tls`` module: the install fails before any key is
    in, and the connection carries on in userspace."""
    tls = ServerTls(pki.server_cert, pki.server_key, pki.ca_cert, kernel_tls=True)
    server_handshakes(tls, pki, 2, tmp_path)  # each server thread asserts the round trip


def test_kernel_tls_off_makes_no_key_log(pki: PkiFiles, tmp_path: Path) -> None:
    recorder = InstallRecorder()
    tls = ServerTls(
        pki.server_cert, pki.server_key, pki.ca_cert, kernel_tls=False, installer=recorder
    )
    server_handshakes(tls, pki, 1, tmp_path)
    assert recorder.keys == []
    assert tls._idle.empty()


def test_storaged_serves_through_the_keys_it_installs(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole server with its record layer on the keys it derived (the
    sequence numbers too): login, writes, reads, a clean close."""
    recorder = InstallRecorder()
    monkeypatch.setattr(
        server_module, "ServerTls", functools.partial(ServerTls, installer=recorder)
    )

    async def body() -> None:
        client = await stack.connect()
        payload = os.urandom(MAX_PAYLOAD)
        await client.write(0, payload)
        assert await client.read(0, MAX_PAYLOAD) == payload
        small = await asyncio.gather(*(client.read(i * BLOCK_SIZE, BLOCK_SIZE) for i in range(64)))
        assert b"".join(small) == payload[: 64 * BLOCK_SIZE]
        await client.close()

    with ThreadedServer(stack) as ts:
        ts.call(body())
    assert len(recorder.keys) == 1


@pytest.mark.parametrize(
    ("content_type", "body", "outcome"),
    [
        (ALERT, bytes((1, 0)), b""),
        (ALERT, bytes((2, 20)), "client sent TLS alert bad_record_mac"),
        (ALERT, bytes((2, 99)), "client sent TLS alert number 99"),
        (HANDSHAKE, bytes((24, 0, 0, 1, 0)), "a KeyUpdate?"),
        (20, b"\x01", "unexpected TLS record (type 20)"),
    ],
)
def test_a_record_other_than_data_ends_the_stream(
    content_type: int, body: bytes, outcome: bytes | str
) -> None:
    if isinstance(outcome, bytes):
        assert transport._control_record(content_type, body) == outcome
        return
    with pytest.raises(ConnectionAbortedError, match=re.escape(outcome)):
        transport._control_record(content_type, body)
