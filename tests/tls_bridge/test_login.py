"""The handshake + login function against a real storaged, over loopback.

The host has no kernel TLS, so after the real pyOpenSSL handshake the keys
go to the userspace record layer (userspace_tls.py) instead of the kernel;
storaged's OpenSSL decrypting our records, and us decrypting its, proves the
keys tls-bridge derives are the ones the kernel would need.  Every failure
must come back as an errno plus a reason an operator can act on.
"""

from __future__ import annotations

import errno
import random
import select
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from netblk.ktls import CIPHERS
from netblk.protocol.codec import ExportGeometry, HelloReply, encode_hello, encode_hello_reply
from netblk.protocol.constants import BLOCK_SIZE, MAX_PAYLOAD, Errno, ExportFlag, LoginStatus
from netblk.tlsconf import TCP_ULP
from netblk_certs.pki import load_issued, make_server_cert, write_issued
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import VOLUME_SIZE, Stack, ThreadedServer
from tests.tls_bridge.fake_servers import fake_server, read_hello_then, tls_server
from tests.tls_bridge.support import (
    LOOPBACK,
    PlainIo,
    RecordingInstaller,
    login_once,
    server_entry,
)
from tls_bridge.channel import install_ktls
from tls_bridge.errors import Deadline, Failure
from tls_bridge.login import LoginResult, _install_failure, handshake_and_login, login
from tls_bridge.tlsclient import tls_handshake


def test_login_verifies_the_server_by_ip_and_reports_the_export(storaged: Stack) -> None:
    result = login_once(storaged.port, server_entry(storaged))
    assert result.status == 0, result.reason
    assert result.reason == ""
    assert result.cipher == "TLS_AES_256_GCM_SHA384"  # OpenSSL's first choice
    assert result.geometry is not None
    assert result.geometry.size == VOLUME_SIZE
    assert result.geometry.max_payload == MAX_PAYLOAD
    assert result.geometry.max_inflight >= 1
    assert not result.geometry.flags & ExportFlag.READ_ONLY
    assert result.geometry.flags & ExportFlag.SEND_FLUSH


@pytest.mark.parametrize("cipher", list(CIPHERS))
def test_each_cipher_carries_requests_after_login(storaged: Stack, cipher: str) -> None:
    """Requests after login continue the record sequence in both directions."""
    install = RecordingInstaller()
    entry = server_entry(storaged, server_name="localhost", ciphersuites=(cipher,))
    with socket.create_connection((LOOPBACK, storaged.port), timeout=10) as sock:
        result = handshake_and_login(sock, entry, "data", 10, install)
        assert result.status == 0, result.reason
        assert result.cipher == cipher
        assert install.keys is not None
        assert install.keys.cipher.name == cipher
        assert install.channel is not None
        sock.settimeout(10)
        io = PlainIo(install.channel)
        data = random.Random(cipher).randbytes(MAX_PAYLOAD)
        offset = 7 * BLOCK_SIZE
        assert io.write(offset, data).error is Errno.OK
        reply = io.read(offset, len(data))
        assert reply.error is Errno.OK
        assert reply.data == data


def test_read_only_rights_come_back_as_the_read_only_flag(storaged: Stack) -> None:
    result = login_once(storaged.port, server_entry(storaged, "bob"))
    assert result.status == 0, result.reason
    assert result.geometry is not None
    assert result.geometry.flags & ExportFlag.READ_ONLY


def expect_failure(result: LoginResult, code: int, *fragments: str) -> None:
    assert result.status == code, (errno.errorcode.get(result.status), result.reason)
    assert result.geometry is None
    for fragment in fragments:
        assert fragment in result.reason
    assert len(result.reason.encode()) <= 127 or "..." in result.reason


@pytest.mark.parametrize(
    ("client", "export", "token", "code", "fragment"),
    [
        ("alice", "data", "wrong-token-but-long-enough", errno.EACCES, "DENIED"),
        ("alice", "nothing-here", None, errno.ENOENT, "NO_EXPORT"),
        ("alice", "other", None, errno.EACCES, "FORBIDDEN"),
        ("bob", "data", "bob-wrong-token-long-enough", errno.EACCES, "DENIED"),
    ],
)
def test_login_refusals(
    storaged: Stack, client: str, export: str, token: str | None, code: int, fragment: str
) -> None:
    entry = server_entry(storaged, client)
    if token is not None:
        entry.token_file.write_text(token + "\n")
    result = login_once(storaged.port, entry, export)
    expect_failure(result, code, fragment, repr(export))
    assert storaged.tokens[client] not in result.reason


def test_rate_limited_logins_say_retry_later(stack: Stack) -> None:
    """Default throttle: 5 failures per peer, then even a good token waits."""
    with ThreadedServer(stack):
        entry = server_entry(stack)
        good_token = entry.token_file.read_text()
        entry.token_file.write_text("definitely-not-the-token\n")
        for _ in range(5):
            expect_failure(login_once(stack.port, entry), errno.EACCES, "DENIED")
        entry.token_file.write_text(good_token)
        expect_failure(login_once(stack.port, entry), errno.EAGAIN, "RATE_LIMITED", "retry")


def test_wrong_ca_rejects_the_server(storaged: Stack, pki: PkiFiles) -> None:
    result = login_once(storaged.port, server_entry(storaged, ca=pki.rogue_ca_cert))
    expect_failure(result, errno.EACCES, "server certificate")


def test_wrong_server_name_rejects_the_server(storaged: Stack) -> None:
    result = login_once(storaged.port, server_entry(storaged, server_name="storage.example.org"))
    expect_failure(result, errno.EACCES, "not storage.example.org", "localhost")


def test_ip_not_in_the_certificate_rejects_the_server(storaged: Stack) -> None:
    # The server is reached on 127.0.0.1 but we insist on another address.
    result = login_once(storaged.port, server_entry(storaged, server_name="192.0.2.7"))
    expect_failure(result, errno.EACCES, "not 192.0.2.7")


@pytest.mark.parametrize(
    ("client_cert", "alert"),
    [("expired", "certificate_expired"), ("rogue", "unknown_ca")],
)
def test_refused_client_certificate_reports_the_servers_alert(
    storaged: Stack, pki: PkiFiles, client_cert: str, alert: str
) -> None:
    """A TLS 1.3 server judges our certificate after our handshake is done;
    its alert arrives as the first record instead of the HELLO reply."""
    cert, key = getattr(pki, f"{client_cert}_cert"), getattr(pki, f"{client_cert}_key")
    result = login_once(storaged.port, server_entry(storaged, cert=cert, key=key))
    expect_failure(result, errno.EACCES, "refused our client certificate", alert)


def test_missing_credentials_are_enokey(storaged: Stack, tmp_path: Path) -> None:
    missing = tmp_path / "gone.key"
    result = login_once(storaged.port, server_entry(storaged, key=missing))
    expect_failure(result, errno.ENOKEY, "client key", str(missing))
    entry = server_entry(storaged)
    entry.token_file.unlink()
    expect_failure(login_once(storaged.port, entry), errno.ENOKEY, "token file")


def test_invalid_export_name_from_the_kernel_is_einval(storaged: Stack) -> None:
    result = login_once(storaged.port, server_entry(storaged), export="../etc")
    expect_failure(result, errno.EINVAL, "export name")


def kernel_has_ktls() -> bool:
    with (
        socket.create_server((LOOPBACK, 0)) as listener,
        socket.create_connection(listener.getsockname()) as sock,
    ):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        except OSError:
            return False
    return True


@pytest.mark.skipif(kernel_has_ktls(), reason="this kernel has kTLS (tests/vm covers it)")
def test_without_kernel_tls_the_install_step_fails_clearly(storaged: Stack) -> None:
    result = login_once(storaged.port, server_entry(storaged), install=install_ktls)
    expect_failure(result, errno.ENOENT, "kTLS setup", "tls module")
    assert result.cipher is not None


def test_silent_server_times_out(storaged: Stack) -> None:
    with socket.create_server((LOOPBACK, 0)) as listener:  # connects, never speaks
        port = listener.getsockname()[1]
        result = login_once(port, server_entry(storaged, port=port), timeout=0.5)
    expect_failure(result, errno.ETIMEDOUT, "TLS handshake timed out", "0.5 s")


def test_server_silent_after_the_handshake_times_out(storaged: Stack, pki: PkiFiles) -> None:
    stop = threading.Event()
    serve = tls_server(pki, read_hello_then(lambda _tls: stop.wait(60)))
    with fake_server(serve) as port:
        # Long enough for a handshake on a loaded machine, short of the stall.
        result = login_once(port, server_entry(storaged, port=port), timeout=5)
        stop.set()
    expect_failure(result, errno.ETIMEDOUT, "login timed out")


def test_server_sending_session_tickets_is_a_protocol_error(storaged: Stack, pki: PkiFiles) -> None:
    serve = tls_server(pki, read_hello_then(lambda _tls: None), tickets=2)
    with fake_server(serve) as port:
        result = login_once(port, server_entry(storaged, port=port))
    expect_failure(result, errno.EPROTO, "post-handshake message")


@pytest.mark.parametrize(
    ("hang_up", "fragment"),
    [
        (lambda tls: tls.unwrap(), "ended the TLS session"),  # close_notify first
        (lambda tls: tls.close(), "refused our certificate? see the server's log"),
    ],
    ids=["close_notify", "plain-close"],
)
def test_server_hanging_up_before_the_reply(
    storaged: Stack, pki: PkiFiles, hang_up: Callable[[ssl.SSLSocket], object], fragment: str
) -> None:
    serve = tls_server(pki, read_hello_then(hang_up))
    with fake_server(serve) as port:
        result = login_once(port, server_entry(storaged, port=port))
    expect_failure(result, errno.ECONNRESET, "before answering HELLO", fragment)


def test_tls_1_2_only_server_fails_the_handshake(storaged: Stack, pki: PkiFiles) -> None:
    serve = tls_server(pki, lambda _tls: None, max_version=ssl.TLSVersion.TLSv1_2)
    with fake_server(serve) as port:
        result = login_once(port, server_entry(storaged, port=port))
    expect_failure(result, errno.EPROTO, "TLS handshake failed")


def test_expired_server_certificate(storaged: Stack, pki: PkiFiles, tmp_path: Path) -> None:
    ca = load_issued(pki.ca_key, pki.ca_cert)
    now = datetime.now(UTC)
    expired = make_server_cert(
        ca,
        "storaged",
        ip_addresses=[LOOPBACK],
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    key, cert = write_issued(expired, tmp_path, "expired-server")
    serve = tls_server(pki, lambda _tls: None, cert=(cert, key))
    with fake_server(serve) as port:
        result = login_once(port, server_entry(storaged, port=port))
    expect_failure(result, errno.EACCES, "server certificate has expired")


class ScriptedChannel:
    """A channel whose server has already said ``incoming``."""

    def __init__(self, incoming: bytes) -> None:
        self.incoming = incoming
        self.sent = b""

    def send(self, data: bytes) -> None:
        self.sent += data

    def recv(self, size: int) -> bytes:
        data, self.incoming = self.incoming[:size], self.incoming[size:]
        return data


def scripted_login(incoming: bytes) -> tuple[ExportGeometry, ScriptedChannel]:
    channel = ScriptedChannel(incoming)
    left, right = socket.socketpair()
    with left, right:
        geometry = login(channel, left, "data", b"t" * 32, Deadline(5))
    return geometry, channel


def test_login_reads_exactly_the_reply_and_nothing_after_it() -> None:
    reply = HelloReply(LoginStatus.OK, export_size=1 << 30, max_inflight=8)
    geometry, channel = scripted_login(encode_hello_reply(reply) + b"kernel's bytes")
    assert channel.sent == encode_hello("data", b"t" * 32)
    assert geometry == ExportGeometry(1 << 30, ExportFlag(0), MAX_PAYLOAD, 8)
    assert channel.incoming == b"kernel's bytes"


@pytest.mark.parametrize(
    ("reply", "code", "fragment"),
    [
        (HelloReply(LoginStatus.BAD_VERSION, version=9), errno.EPROTO, "(it speaks 9)"),
        (HelloReply(LoginStatus.BAD_REQUEST), errno.EPROTO, "BAD_REQUEST"),
        (HelloReply(LoginStatus.UNAVAILABLE), errno.EAGAIN, "cannot serve the export now"),
        (HelloReply(LoginStatus.OK, block_size=512, max_inflight=1), errno.EPROTO, "block size"),
        (HelloReply(LoginStatus.OK, export_size=4097, max_inflight=1), errno.EPROTO, "4097"),
        (HelloReply(LoginStatus.OK, max_payload=0, max_inflight=1), errno.EPROTO, "max payload"),
        (HelloReply(LoginStatus.OK), errno.EPROTO, "max inflight 0"),
    ],
)
def test_refusals_and_nonsense_replies(reply: HelloReply, code: int, fragment: str) -> None:
    with pytest.raises(Failure) as info:
        scripted_login(encode_hello_reply(reply))
    assert info.value.code == code
    assert fragment in info.value.reason


def test_garbage_instead_of_a_reply_is_a_protocol_error() -> None:
    with pytest.raises(Failure, match=r"^login: bad HELLO reply magic 0x48545450$") as info:
        scripted_login(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert info.value.code == errno.EPROTO


def test_a_refusal_that_beat_the_ktls_install_is_reported(storaged: Stack) -> None:
    """TLS 1.3 lets our handshake finish before storaged judges the client
    certificate; when its alert and close arrive before kTLS is installed,
    the reason must still name the refusal, not the dead socket."""
    pki = storaged.pki
    entry = server_entry(storaged, cert=pki.rogue_cert, key=pki.rogue_key)
    with socket.create_connection((LOOPBACK, storaged.port), timeout=60) as sock:
        handshake = tls_handshake(sock, entry, Deadline(60))
        assert select.select([sock], [], [], 60)[0], "storaged never refused the rogue certificate"
        failure = _install_failure(OSError(errno.ENOTCONN, "not connected"), handshake)
    assert failure.code == errno.EACCES
    assert "server refused our client certificate: TLS alert unknown_ca" in failure.reason
