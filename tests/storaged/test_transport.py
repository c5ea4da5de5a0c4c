"""Transport guarantees: no post-handshake TLS messages, IPv6, and bounded
in-flight work per connection (backpressure)."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from storaged.client import NetblkClient
from storaged.config import load_config
from storaged.protocol.codec import NEED_DATA, ClientConnection, HelloReply, Reply
from storaged.protocol.constants import BLOCK_SIZE, MAX_PAYLOAD, Cmd, LoginStatus
from storaged.server import StorageServer
from storaged.session import Session
from storaged.tlsconf import OP_ENABLE_KTLS, client_context, kernel_tls_directions, server_context
from storaged.volume import ReadResult, Volume
from tests.c_program import c_program_output
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import Stack, ThreadedServer, raw_tls_socket, run


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


@pytest.mark.parametrize("kernel_tls", [True, False])
def test_kernel_tls_is_asked_of_openssl_when_configured(pki: PkiFiles, kernel_tls: bool) -> None:
    context = server_context(pki.server_cert, pki.server_key, pki.ca_cert, kernel_tls=kernel_tls)
    assert bool(context.options & OP_ENABLE_KTLS) is kernel_tls


def test_op_enable_ktls_is_openssls(tmp_path: Path) -> None:
    """Python's ssl names the option only from 3.12; ours must be OpenSSL's."""
    printed = c_program_output(
        tmp_path,
        "#include <stdio.h>\n#include <openssl/ssl.h>\n"
        'int main(void) { printf("%llu", (unsigned long long)SSL_OP_ENABLE_KTLS); }\n',
    )
    assert int(printed) == OP_ENABLE_KTLS


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
    real_read = Volume.read

    def stalled_read(self: Volume, offset: int, size: int) -> ReadResult:
        release.wait(timeout=30)
        return real_read(self, offset, size)

    batches: list[tuple[int, int]] = []  # (requests, payload bytes) per answer
    real_answer = Session._answer

    def recorded_answer(self: Session, batch: Any) -> None:
        if batch.records:
            batches.append((len(batch.records), batch.payload))
        real_answer(self, batch)

    monkeypatch.setattr(Volume, "read", stalled_read)
    monkeypatch.setattr(Session, "_answer", recorded_answer)

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
