"""Kernel TLS for real (in the guest): tls-bridge's handshake and key
install against storaged (which installs the kernel's keys for its own end
too), for each cipher.

After login the socket carries netblk requests as plain bytes and the kernel
does the record layer at both ends, and 1 MiB each way spans many records in
both directions.  Failures that only kTLS can surface (an alert or a session
ticket arriving as a control record, at either end) are checked too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from netblk.ktls import ALERT, CIPHERS, ktls_keys
from netblk.protocol.constants import BLOCK_SIZE, MAX_PAYLOAD, Cmd, Errno, ExportFlag
from netblk.tlsconf import (
    SOL_TLS,
    TCP_ULP,
    TLS_RX_EXPECT_NO_PAD,
    TLS_SET_RECORD_TYPE,
    kernel_tls_directions,
)
from storaged.transport import install_kernel_tls
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import VOLUME_SIZE, Stack, ThreadedServer
from tests.tls_bridge.conftest import RELAXED_THROTTLE
from tests.tls_bridge.fake_kernel import FakeKernel, bridge_until, config_for
from tests.tls_bridge.fake_servers import fake_server, read_hello_then, tls_server
from tests.tls_bridge.support import LOOPBACK, PlainIo, login_once, server_entry
from tests.vm.module import insmod, loaded, rmmod
from tls_bridge.channel import KtlsChannel, install_ktls
from tls_bridge.errors import Failure
from tls_bridge.login import handshake_and_login
from tls_bridge.netlink import GenlUpcall

TLS_STAT = Path("/proc/net/tls_stat")
ULP_NAME_MAX = 16
#: storaged's argon2id token check takes seconds under software emulation
#: on a shared machine; these tests are about kTLS, not deadlines.
TIMEOUT = 60


@pytest.fixture(scope="module")
def served(pki: PkiFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    root = tmp_path_factory.mktemp("ktls") / "stack"
    with ThreadedServer(Stack(pki=pki, root=root, extra_config=RELAXED_THROTTLE)) as server:
        yield server


class PlainSocket:
    """The socket itself, no TLS in sight: send and recv are plain syscalls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)


def tls_stat() -> dict[str, int]:
    return {
        name: int(value)
        for name, value in (line.split() for line in TLS_STAT.read_text().splitlines())
    }


def read_back(server: ThreadedServer, offset: int, length: int) -> bytes:
    """Read through the ordinary client library: what storaged really stored."""

    async def read() -> bytes:
        async with await server.stack.connect() as client:
            return await client.read(offset, length)

    return server.call(read())


def exercise(io: PlainIo, region: int, seed: str) -> bytes:
    """1 MiB round trip plus small scattered I/O; returns the big payload."""
    rng = random.Random(seed)
    big = rng.randbytes(MAX_PAYLOAD)
    assert io.write(region, big).error is Errno.OK
    reply = io.read(region, len(big))
    assert reply.error is Errno.OK
    assert reply.data == big
    for block in (300, 301, 4000):
        small = rng.randbytes(BLOCK_SIZE)
        assert io.write(block * BLOCK_SIZE, small).error is Errno.OK
        assert io.read(block * BLOCK_SIZE, BLOCK_SIZE).data == small
    assert io.call(Cmd.FLUSH).error is Errno.OK
    return big


@pytest.mark.parametrize("index", range(len(CIPHERS)), ids=list(CIPHERS))
def test_ktls_carries_netblk_io(
    served: ThreadedServer, index: int, caplog: pytest.LogCaptureFixture
) -> None:
    cipher = list(CIPHERS)[index]
    region = (8 + 2 * index) * MAX_PAYLOAD
    entry = server_entry(served.stack, server_name="localhost", ciphersuites=(cipher,))
    caplog.set_level(logging.INFO, logger="storaged.session")
    before = tls_stat()
    with socket.create_connection((LOOPBACK, served.stack.port), timeout=10) as sock:
        result = handshake_and_login(sock, entry, "data", TIMEOUT)  # the real install_ktls
        assert result.status == 0, result.reason
        assert result.cipher == cipher
        assert result.geometry is not None
        assert result.geometry.size == VOLUME_SIZE
        ulp = sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, ULP_NAME_MAX)
        assert ulp.rstrip(b"\0") == b"tls"
        during = tls_stat()
        # Both ends, both ways.
        assert during["TlsCurrTxSw"] == before["TlsCurrTxSw"] + 2
        assert during["TlsCurrRxSw"] == before["TlsCurrRxSw"] + 2
        logins = [r for r in caplog.records if getattr(r, "event", None) == "login_ok"]
        assert [getattr(r, "kernel_tls", None) for r in logins] == ["tx+rx"]
        sock.settimeout(60)
        big = exercise(PlainIo(PlainSocket(sock)), region, cipher)
    assert read_back(served, region, len(big)) == big


def test_the_kernels_socket_works_after_the_bridge_hands_it_back(served: ThreadedServer) -> None:
    """The whole upcall with kTLS: after DONE the bridge closed its fd, and
    the "driver's" own reference carries requests."""
    stack = served.stack
    kernel = FakeKernel(stack.port, timeout_ms=TIMEOUT * 1000)
    try:

        async def body() -> None:
            kernel.post("data")
            kernel.post("data")
            await bridge_until(kernel, config_for(server_entry(stack)), 2, handshake_and_login)

        asyncio.run(body())
        assert all(done.status == 0 for done in kernel.dones.values()), kernel.dones
        for cookie, item in kernel.posted.items():
            assert kernel.fd_closed(cookie)
            item.sock.settimeout(60)
            exercise(PlainIo(PlainSocket(item.sock)), (16 + cookie % 2) * MAX_PAYLOAD, str(cookie))
    finally:
        kernel.close()


def test_read_only_login_over_ktls(served: ThreadedServer) -> None:
    with socket.create_connection((LOOPBACK, served.stack.port), timeout=10) as sock:
        result = handshake_and_login(sock, server_entry(served.stack, "bob"), "data", TIMEOUT)
        assert result.status == 0, result.reason
        assert result.geometry is not None
        assert result.geometry.flags & ExportFlag.READ_ONLY
        sock.settimeout(30)
        io = PlainIo(PlainSocket(sock))
        assert io.write(0, bytes(BLOCK_SIZE)).error is Errno.PERM


def test_refused_login_is_read_through_ktls(served: ThreadedServer) -> None:
    entry = server_entry(served.stack)
    entry.token_file.write_text("not-the-token-but-long-enough\n")
    result = login_once(served.stack.port, entry, timeout=TIMEOUT, install=install_ktls)
    assert result.status == errno.EACCES, result.reason
    assert "DENIED" in result.reason


@pytest.mark.parametrize(
    ("client_cert", "alert"), [("expired", "certificate_expired"), ("rogue", "unknown_ca")]
)
def test_server_alert_arrives_as_a_control_record(
    served: ThreadedServer, pki: PkiFiles, client_cert: str, alert: str
) -> None:
    cert, key = getattr(pki, f"{client_cert}_cert"), getattr(pki, f"{client_cert}_key")
    with fake_server(tls_server(pki, lambda _tls: None)) as port:
        entry = server_entry(served.stack, port=port, cert=cert, key=key)
        result = login_once(port, entry, timeout=TIMEOUT, install=install_ktls)
    assert result.status == errno.EACCES, result.reason
    assert alert in result.reason


def test_session_ticket_arrives_as_a_control_record(served: ThreadedServer, pki: PkiFiles) -> None:
    with fake_server(tls_server(pki, read_hello_then(lambda _tls: None), tickets=2)) as port:
        result = login_once(
            port, server_entry(served.stack, port=port), timeout=TIMEOUT, install=install_ktls
        )
    assert result.status == errno.EPROTO, result.reason
    assert "post-handshake message" in result.reason


def test_storaged_lets_the_kernel_open_records_in_place() -> None:
    """storaged's install asks for zero-copy decryption (no padding expected)."""
    keys = ktls_keys(CIPHERS["TLS_AES_256_GCM_SHA384"], bytes(48), bytes(range(48)))
    with (
        socket.create_server((LOOPBACK, 0)) as listener,
        socket.create_connection(listener.getsockname()) as client,
    ):
        server, _ = listener.accept()
        with server:
            install_kernel_tls(server, keys, None)
            assert server.getsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD) == 1
            assert kernel_tls_directions(server) == "tx+rx"
            assert kernel_tls_directions(client) == "none"


def send_alert(sock: socket.socket, level: int, description: int) -> None:
    """An alert record through the kernel's TLS."""
    sock.sendmsg([bytes((level, description))], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes((ALERT,)))])


@pytest.mark.parametrize(
    ("description", "event", "reason"),
    [
        (0, "closed", None),  # close_notify: the end of the stream
        (40, "connection_lost", "client sent TLS alert handshake_failure"),
    ],
)
def test_storaged_reads_a_clients_alert_as_a_control_record(
    served: ThreadedServer,
    caplog: pytest.LogCaptureFixture,
    description: int,
    event: str,
    reason: str | None,
) -> None:
    """storaged's kernel end opens an alert as what it is, and answers by
    closing with its own close_notify."""
    caplog.set_level(logging.INFO, logger="storaged.session")
    with socket.create_connection((LOOPBACK, served.stack.port), timeout=10) as sock:
        result = handshake_and_login(sock, server_entry(served.stack), "data", TIMEOUT)
        assert result.status == 0, result.reason
        sock.settimeout(30)
        io = PlainIo(PlainSocket(sock))
        assert io.read(0, BLOCK_SIZE).error is Errno.OK
        send_alert(sock, 1 if description == 0 else 2, description)
        with pytest.raises(Failure) as ended:
            KtlsChannel(sock).recv(BLOCK_SIZE)
    assert "ended the TLS session" in ended.value.reason  # storaged's close_notify
    ends = [r for r in caplog.records if getattr(r, "event", None) in {"closed", "connection_lost"}]
    assert [(r.event, getattr(r, "reason", None)) for r in ends] == [(event, reason)]


def test_the_upcall_binds_to_the_real_driver() -> None:
    """pyroute2 finds the driver's family and group; ACCEPT with nothing
    pending is a clean None (the driver's -ENOENT)."""
    loaded_before = loaded()
    if not loaded_before:
        insmod()
    try:

        async def body() -> None:
            upcall = await GenlUpcall.open()
            try:
                assert await upcall.accept() is None
            finally:
                upcall.close()

        asyncio.run(body())
    finally:
        if not loaded_before:
            rmmod()
