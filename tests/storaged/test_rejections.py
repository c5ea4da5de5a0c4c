"""Acceptance: every rejection case gets a clear error and no data change.

One server serves the module.  Before each case its login throttle is reset,
a known pattern is written through alice, and the volume digest and the stats
are taken; the case then provokes one rejection and checks four things: what
the client is told, that the server logged the failure with the peer address
and a reason, that not one byte of the data volume changed, and that a good
client is still served afterwards.

The pattern sits at the start of the export and in its last 64 KiB, so a
request that straddles the end of the export would overwrite it if the
server carried out the in-range part.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netblk.protocol.codec import ClientConnection, HelloReply, encode_hello, encode_request
from netblk.protocol.constants import (
    BLOCK_SIZE,
    HELLO_REPLY,
    MAX_EXPORT_NAME,
    MAX_PAYLOAD,
    PROTO_VERSION,
    REPLY,
    REPLY_MAGIC,
    REQUEST,
    Cmd,
    Errno,
    ExportFlag,
    LoginStatus,
)
from netblk_certs.pki import load_issued, make_client_cert, write_issued
from storaged.client import ConnectionLost, ExportInfo, LoginError, NetblkClient, RequestError
from storaged.config import load_config
from storaged.login import FailureThrottle
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import VOLUME_SIZE, Stack, ThreadedServer

PATTERN_LEN = 64 << 10
HEAD = 0
TAIL = VOLUME_SIZE - PATTERN_LEN
PATTERN = {
    HEAD: random.Random(1).randbytes(PATTERN_LEN),
    TAIL: random.Random(2).randbytes(PATTERN_LEN),
}
#: What hostile writes try to put over the pattern.
JUNK = b"\xa5" * (2 * PATTERN_LEN)
WRONG_TOKEN = b"this-is-not-the-token-of-alice"
HANDLE = 0x0123_4567_89AB_CDEF
PEER_RE = re.compile(r"127\.0\.0\.1:[1-9][0-9]*")
LOG_WAIT = 30.0  # only waited out when a record is missing
SOCKET_TIMEOUT = 60.0  # a bound against hangs, generous for loaded CI

Certs = dict[str, tuple[Path, Path] | None]


# --- one case's environment ---------------------------------------------------


@dataclass
class Env:
    """A running server with a clean login throttle, the pattern written and
    the data volume's digest and the stats taken before the case."""

    stack: Stack
    ts: ThreadedServer
    caplog: pytest.LogCaptureFixture
    certs: Certs
    digest: str = ""
    baseline: dict[str, Any] = field(default_factory=dict)

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a client coroutine on the server's loop thread."""
        return self.ts.call(coro)

    def snapshot(self) -> dict[str, Any]:
        server = self.ts.server
        assert server is not None

        async def take() -> dict[str, Any]:  # read the stats on the loop that writes them
            return server.snapshot()

        return self.ts.call(take())

    def stats_delta(self) -> dict[str, Any]:
        """What the case added to the counters that matter here."""
        now = self.snapshot()
        failed = Counter(now["logins_failed"])
        failed.subtract(self.baseline["logins_failed"])
        return {
            "logins_ok": now["logins_ok"] - self.baseline["logins_ok"],
            "logins_failed": {key: n for key, n in failed.items() if n},
            "protocol_errors": now["protocol_errors"] - self.baseline["protocol_errors"],
        }

    def context(
        self, cert: str = "alice", max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ) -> ssl.SSLContext:
        """A client TLS context presenting ``certs[cert]`` (or no certificate)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.maximum_version = max_version
        context.load_verify_locations(cafile=self.stack.pki.ca_cert)
        chain = self.certs[cert]
        if chain is not None:
            context.load_cert_chain(*chain)
        return context

    def arm(self) -> Env:
        """Prepare the next case: forget earlier failed logins, write the pattern,
        take the digest and the stats, clear the captured log."""
        server = self.ts.server
        assert server is not None
        self.caplog.set_level(logging.DEBUG)

        async def prepare() -> None:
            old = server.gatekeeper.throttle
            server.gatekeeper.throttle = FailureThrottle(old.max_failures, old.window)
            await write_pattern(self.stack)

        self.ts.call(prepare())
        self.digest = volume_digest(self.stack)
        self.baseline = self.snapshot()
        self.caplog.clear()
        return self


def volume_digest(stack: Stack) -> str:
    return hashlib.sha256(stack.volume_path("data").read_bytes()).hexdigest()


async def write_pattern(stack: Stack) -> None:
    async with await stack.connect("data", "alice") as alice:
        for offset, data in PATTERN.items():
            await alice.write(offset, data)
        await alice.flush()


@pytest.fixture(scope="module")
def certs(pki: PkiFiles, tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Client certificates by name; carol is from the real CA but not a client."""
    carol = make_client_cert(load_issued(pki.ca_key, pki.ca_cert), "carol")
    carol_key, carol_cert = write_issued(carol, tmp_path_factory.mktemp("carol"), "client-carol")
    return {
        "alice": (pki.alice_cert, pki.alice_key),
        "bob": (pki.bob_cert, pki.bob_key),
        "carol": (carol_cert, carol_key),
        "expired": (pki.expired_cert, pki.expired_key),
        "rogue": (pki.rogue_cert, pki.rogue_key),
        "none": None,
    }


@pytest.fixture(scope="module")
def shared_server(
    pki: PkiFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedServer]:
    """One server for the module (starting one unlocks two volumes: seconds);
    each test gets a clean login throttle and compares stats to a baseline."""
    with ThreadedServer(Stack(pki=pki, root=tmp_path_factory.mktemp("rejections"))) as ts:
        yield ts


@pytest.fixture
def env(shared_server: ThreadedServer, caplog: pytest.LogCaptureFixture, certs: Certs) -> Env:
    return Env(shared_server.stack, shared_server, caplog, certs).arm()


# --- the server's log ---------------------------------------------------------


def wait_for_records(env: Env, event: str, count: int = 1) -> list[logging.LogRecord]:
    """The records of ``event``, once ``count`` arrived (the server logs on its thread)."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        found = [r for r in env.caplog.records if getattr(r, "event", None) == event]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def check_record(
    record: logging.LogRecord, reason: str, peer: str | None = None, **fields: object
) -> None:
    assert record.name.startswith("storaged."), record.name
    logged_peer = getattr(record, "peer", "")
    assert PEER_RE.fullmatch(logged_peer) if peer is None else logged_peer == peer, logged_peer
    assert reason.lower() in str(getattr(record, "reason", "")).lower(), vars(record)
    for key, value in fields.items():
        assert getattr(record, key) == value, (key, vars(record))


def assert_logged(
    env: Env, event: str, reason: str, peer: str | None = None, **fields: object
) -> None:
    """Exactly one ``event`` record, naming the peer and giving ``reason``."""
    records = wait_for_records(env, event)
    assert len(records) == 1, [r.getMessage() for r in records]
    check_record(records[0], reason, peer, **fields)


# --- raw TLS clients ----------------------------------------------------------


def connect_tls(env: Env, context: ssl.SSLContext, source: str = "127.0.0.1") -> ssl.SSLSocket:
    sock = socket.create_connection(
        ("127.0.0.1", env.stack.port), timeout=SOCKET_TIMEOUT, source_address=(source, 0)
    )
    try:
        return context.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def local_peer(sock: socket.socket) -> str:
    """How the server names this connection's client end in its logs."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def recv_exact(sock: ssl.SSLSocket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError(f"server closed after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def read_to_close(sock: ssl.SSLSocket) -> bytes:
    """Everything until the server closes; a socket timeout (a hang) fails the test."""
    chunks = []
    with contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_hello_reply(data: bytes) -> HelloReply:
    conn = ClientConnection()
    conn.receive_data(data)
    reply = conn.next_event()
    assert isinstance(reply, HelloReply), reply
    return reply


def raw_login(
    env: Env, client: str = "alice", source: str = "127.0.0.1"
) -> tuple[ssl.SSLSocket, HelloReply]:
    sock = connect_tls(env, env.context(client), source)
    sock.sendall(encode_hello("data", env.stack.tokens[client].encode()))
    return sock, parse_hello_reply(recv_exact(sock, HELLO_REPLY.size))


@contextlib.contextmanager
def logged_in(
    env: Env, client: str = "alice", source: str = "127.0.0.1"
) -> Iterator[ssl.SSLSocket]:
    sock, reply = raw_login(env, client, source)
    with sock:
        assert reply.status is LoginStatus.OK, reply
        yield sock


def read_reply(sock: ssl.SSLSocket) -> tuple[int, Errno]:
    magic, error, handle = REPLY.layout.unpack(recv_exact(sock, REPLY.size))
    assert magic == REPLY_MAGIC, hex(magic)
    return handle, Errno(error)


def raw_read(sock: ssl.SSLSocket, offset: int, length: int, handle: int = 7) -> bytes:
    sock.sendall(encode_request(Cmd.READ, handle, offset, length))
    assert read_reply(sock) == (handle, Errno.OK)
    return recv_exact(sock, length)


# --- the invariant after every case --------------------------------------------


def assert_nothing_changed(env: Env, reader: str = "alice", source: str = "127.0.0.1") -> None:
    """Not one byte of the volume changed, and a good client is still served."""
    assert volume_digest(env.stack) == env.digest, "the rejected case changed the data volume"
    with logged_in(env, reader, source) as sock:
        for offset, data in PATTERN.items():
            assert raw_read(sock, offset, len(data)) == data
        sock.sendall(encode_request(Cmd.DISCONNECT, 0))
        assert read_to_close(sock) == b""
    errors = [r.getMessage() for r in env.caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def login(env: Env, context: ssl.SSLContext, export: str = "data", token: bytes = b"") -> None:
    """Log in with the client library; returns only if the server admitted us."""

    async def attempt() -> None:
        client = await NetblkClient.connect(
            "127.0.0.1",
            env.stack.port,
            ssl_context=context,
            export=export,
            token=token or env.stack.tokens["alice"].encode(),
            server_hostname="localhost",
        )
        await client.close()

    env.call(attempt())


# --- TLS: refused before any login ----------------------------------------------


@dataclass(frozen=True)
class TlsFailure:
    cert: str  # the client certificate presented ("none": no certificate)
    alert: str  # the TLS alert the client should be told
    reason: str  # what the server's log reason must mention
    max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED


TLS_FAILURES = [
    pytest.param(
        TlsFailure("none", "TLSV13_ALERT_CERTIFICATE_REQUIRED", "certificate"), id="no-client-cert"
    ),
    pytest.param(TlsFailure("rogue", "TLSV1_ALERT_UNKNOWN_CA", "certificate"), id="other-ca"),
    pytest.param(
        TlsFailure("expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED", "expired"), id="expired-cert"
    ),
    pytest.param(
        TlsFailure("alice", "TLSV1_ALERT_PROTOCOL_VERSION", "protocol", ssl.TLSVersion.TLSv1_2),
        id="tls1.2-only-client",
    ),
]


@pytest.mark.parametrize("case", TLS_FAILURES)
def test_tls_failure_is_refused_before_login(env: Env, case: TlsFailure) -> None:
    context = env.context(case.cert, case.max_version)
    # No HELLO reply ever comes: the library reports a lost connection or the TLS error.
    with pytest.raises((ConnectionLost, ConnectionError, ssl.SSLError)):
        login(env, context)
    assert_logged(env, "login_failed", case.reason, client=None)
    assert env.stats_delta()["logins_failed"] == {"tls": 1}
    assert_nothing_changed(env)


def tls_verdict(env: Env, context: ssl.SSLContext) -> str:
    """What the server tells a client about its handshake: the alert, or nothing."""
    try:
        with connect_tls(env, context) as sock:
            # TLS 1.3: the client finishes first; the verdict on its certificate follows.
            data = sock.recv(1)
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    return f"no alert, the connection just ended (recv gave {data!r})"


@pytest.mark.parametrize("case", TLS_FAILURES)
def test_tls_failure_tells_the_client_why(env: Env, case: TlsFailure) -> None:
    """RFC 8446 6.2: a fatal error is reported with an alert, so the client can
    tell a refused certificate from a crashed server or a dropped network."""
    assert tls_verdict(env, env.context(case.cert, case.max_version)) == case.alert


# --- login refused with a status ------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    status: LoginStatus
    reason: str  # what the server's log reason must mention
    cert: str = "alice"  # also the identity (CN) the server sees
    token: bytes = b""  # empty: alice's real token
    export: str = "data"


REFUSALS = [
    pytest.param(Refusal(LoginStatus.DENIED, "token", token=WRONG_TOKEN), id="wrong-token"),
    pytest.param(Refusal(LoginStatus.DENIED, "token", token=b"\xff" * 32), id="token-not-utf8"),
    pytest.param(Refusal(LoginStatus.DENIED, "carol", cert="carol"), id="cn-not-a-client"),
    pytest.param(Refusal(LoginStatus.NO_EXPORT, "nosuch", export="nosuch"), id="unknown-export"),
    pytest.param(Refusal(LoginStatus.FORBIDDEN, "other", export="other"), id="no-rights-on-export"),
]


@pytest.mark.parametrize("case", REFUSALS)
def test_login_refused(env: Env, case: Refusal) -> None:
    with pytest.raises(LoginError) as refused:
        login(env, env.context(case.cert), case.export, case.token)
    assert refused.value.status is case.status
    assert_logged(
        env,
        "login_failed",
        case.reason,
        status=case.status.name,
        client=case.cert,
        requested_export=case.export,
    )
    assert env.stats_delta()["logins_failed"] == {case.status.name.lower(): 1}
    assert_nothing_changed(env)


# --- what the throttle counts -----------------------------------------------------

#: Failures that guess no credential, so that none may lock the clients
#: behind the same address out.
GUESSLESS_FAILURES = TLS_FAILURES + [
    param for param in REFUSALS if param.id in ("unknown-export", "no-rights-on-export")
]


@pytest.mark.parametrize("case", GUESSLESS_FAILURES)
def test_failures_that_guess_no_credential_never_throttle(
    env: Env, case: TlsFailure | Refusal
) -> None:
    attempts = 3 * load_config(env.stack.config_path).login.max_failures
    for _ in range(attempts):
        if isinstance(case, TlsFailure):
            with pytest.raises((ConnectionLost, ConnectionError, ssl.SSLError)):
                login(env, env.context(case.cert, case.max_version))
        else:
            with pytest.raises(LoginError) as refused:
                login(env, env.context(case.cert), case.export, case.token)
            assert refused.value.status is case.status
    kind = "tls" if isinstance(case, TlsFailure) else case.status.name.lower()
    # Each is logged after it is counted, maybe after the client heard of it.
    assert len(wait_for_records(env, "login_failed", attempts)) == attempts
    assert env.stats_delta()["logins_failed"] == {kind: attempts}
    assert_nothing_changed(env)  # alice, from the same address, logs in


# --- read-only access -----------------------------------------------------------


async def bob_tries(stack: Stack, op: Cmd) -> tuple[ExportInfo, RequestError, bytes]:
    """bob (ro on data) attempts ``op`` over the pattern, then reads it."""
    async with await stack.connect("data", "bob") as bob:
        data = JUNK[:PATTERN_LEN] if op is Cmd.WRITE else b""
        with pytest.raises(RequestError) as refused:
            await bob.request(op, HEAD, PATTERN_LEN, data=data)
        return bob.info, refused.value, await bob.read(HEAD, PATTERN_LEN)


@pytest.mark.parametrize("op", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES], ids=lambda op: op.name)
def test_read_only_client_cannot_change_data(env: Env, op: Cmd) -> None:
    info, refused, data_after = env.call(bob_tries(env.stack, op))
    assert info.read_only
    assert info.flags & ExportFlag.READ_ONLY
    assert (refused.op, refused.error) == (op, Errno.PERM)
    assert data_after == PATTERN[HEAD]  # the connection stays usable
    assert_logged(env, "bad_request", "read-only", client="bob", error="PERM", opcode=op)
    assert_nothing_changed(env)


# --- malformed frames after a valid login -----------------------------------------


@dataclass(frozen=True)
class BadFrame:
    frame: bytes
    error: Errno | None  # the error reply; None: the server must close without one
    reason: str  # what the server's log reason must mention


def request(opcode: int, offset: int, length: int, payload: int = 0) -> bytes:
    """A request header with ``HANDLE`` followed by ``payload`` bytes of junk."""
    return encode_request(opcode, HANDLE, offset, length) + JUNK[:payload]


BAD_FRAMES = [
    pytest.param(
        BadFrame(
            REQUEST.layout.pack(0xDEADBEEF, 0, Cmd.READ, HANDLE, 0, BLOCK_SIZE, 0), None, "magic"
        ),
        id="bad-request-magic",
    ),
    pytest.param(
        BadFrame(encode_hello("data", WRONG_TOKEN), None, "magic"), id="hello-after-login"
    ),
    pytest.param(
        BadFrame(request(Cmd.WRITE, HEAD, MAX_PAYLOAD + BLOCK_SIZE), None, "max payload"),
        id="oversized-write",
    ),
    pytest.param(
        BadFrame(request(Cmd.READ, TAIL, 2 * PATTERN_LEN), Errno.INVAL, "beyond"),
        id="read-beyond-end",
    ),
    pytest.param(
        BadFrame(request(Cmd.READ, VOLUME_SIZE, BLOCK_SIZE), Errno.INVAL, "beyond"),
        id="read-past-end",
    ),
    pytest.param(
        BadFrame(request(Cmd.WRITE, TAIL, 2 * PATTERN_LEN, 2 * PATTERN_LEN), Errno.NOSPC, "beyond"),
        id="write-beyond-end",
    ),
    pytest.param(
        BadFrame(
            request(Cmd.WRITE, 2**64 - BLOCK_SIZE, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE),
            Errno.NOSPC,
            "beyond",
        ),
        id="write-offset-wraps-to-zero",
    ),
    pytest.param(
        BadFrame(request(Cmd.WRITE_ZEROES, TAIL, 2 * PATTERN_LEN), Errno.NOSPC, "beyond"),
        id="write-zeroes-beyond-end",
    ),
    pytest.param(
        BadFrame(request(Cmd.TRIM, TAIL, 2 * PATTERN_LEN), Errno.INVAL, "beyond"),
        id="trim-beyond-end",
    ),
    pytest.param(
        BadFrame(request(Cmd.WRITE, HEAD + 512, BLOCK_SIZE, BLOCK_SIZE), Errno.INVAL, "aligned"),
        id="unaligned-offset",
    ),
    pytest.param(
        BadFrame(
            request(Cmd.WRITE, HEAD, BLOCK_SIZE + 512, BLOCK_SIZE + 512), Errno.INVAL, "aligned"
        ),
        id="unaligned-length",
    ),
    pytest.param(BadFrame(request(0x77, 0, 0), Errno.INVAL, "unknown opcode"), id="unknown-opcode"),
]


@pytest.mark.parametrize("case", BAD_FRAMES)
def test_malformed_frame_after_login(env: Env, case: BadFrame) -> None:
    with logged_in(env) as sock:
        peer = local_peer(sock)
        sock.sendall(case.frame)
        if case.error is None:
            assert read_to_close(sock) == b""
        else:
            assert read_reply(sock) == (HANDLE, case.error)
            assert raw_read(sock, HEAD, PATTERN_LEN) == PATTERN[HEAD]  # still usable
    if case.error is None:
        assert_logged(env, "protocol_error", case.reason, peer=peer, client="alice")
    else:
        assert_logged(
            env, "bad_request", case.reason, peer=peer, error=case.error.name, handle=HANDLE
        )
    assert env.stats_delta()["protocol_errors"] == (case.error is None)
    assert_nothing_changed(env)


REUSED = [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.FLUSH]


@pytest.mark.parametrize("first", [Cmd.READ, Cmd.FLUSH], ids=lambda op: op.name)
@pytest.mark.parametrize("again", REUSED, ids=lambda op: op.name)
def test_a_handle_sent_again_while_in_flight_ends_the_connection(
    env: Env, first: Cmd, again: Cmd
) -> None:
    """docs/protocol.md: reusing a handle that is in flight is fatal, whatever
    the opcodes; the reuses that change data never reach the volume."""
    offset, length = (0, 0) if first is Cmd.FLUSH else (TAIL, BLOCK_SIZE)
    reuse_length = 0 if again is Cmd.FLUSH else BLOCK_SIZE
    payload = BLOCK_SIZE if again is Cmd.WRITE else 0
    frames = request(first, offset, length) + 3 * request(again, HEAD, reuse_length, payload)
    assert len(frames) <= 16384  # one TLS record: storaged receives them at once
    with logged_in(env) as sock:
        peer = local_peer(sock)
        sock.sendall(frames)
        answered = read_to_close(sock)
    # At most the first request's reply (and data) came back, then the close.
    assert len(answered) in (0, REPLY.size + length)
    assert_logged(env, "protocol_error", "already in flight", peer=peer, client="alice")
    assert env.stats_delta()["protocol_errors"] == 1
    assert_nothing_changed(env)


# --- malformed HELLO ------------------------------------------------------------


@dataclass(frozen=True)
class BadHello:
    build: Callable[[bytes], bytes]  # the frame, from alice's real token
    status: LoginStatus | None  # the HELLO reply's status; None: closed without one
    reason: str


BAD_HELLOS = [
    pytest.param(
        BadHello(
            lambda token: struct.pack(">I", 0x4E424C00) + encode_hello("data", token)[4:],
            None,
            "magic",
        ),
        id="wrong-magic",
    ),
    pytest.param(
        BadHello(
            lambda token: encode_hello("data", token, PROTO_VERSION + 1),
            LoginStatus.BAD_VERSION,
            "version",
        ),
        id="wrong-version",
    ),
    pytest.param(
        BadHello(
            lambda token: encode_hello("data/../other", token),
            LoginStatus.BAD_REQUEST,
            "export name",
        ),
        id="export-name-with-slash",
    ),
    pytest.param(
        BadHello(
            lambda token: encode_hello("d" * (MAX_EXPORT_NAME + 1), token),
            LoginStatus.BAD_REQUEST,
            "export name",
        ),
        id="export-name-too-long",
    ),
    pytest.param(
        BadHello(lambda token: encode_hello("data", token[:8]), LoginStatus.BAD_REQUEST, "token"),
        id="token-too-short",
    ),
]


@pytest.mark.parametrize("case", BAD_HELLOS)
def test_bad_hello(env: Env, case: BadHello) -> None:
    with connect_tls(env, env.context()) as sock:
        peer = local_peer(sock)
        sock.sendall(case.build(env.stack.tokens["alice"].encode()))
        answer = read_to_close(sock)
    if case.status is None:
        assert answer == b""
    else:
        assert len(answer) == HELLO_REPLY.size, answer
        reply = parse_hello_reply(answer)
        assert (reply.status, reply.version, reply.export_size) == (case.status, PROTO_VERSION, 0)
    assert_logged(env, "protocol_error", case.reason, peer=peer)
    assert env.stats_delta() == {"logins_ok": 0, "logins_failed": {}, "protocol_errors": 1}
    assert_nothing_changed(env)


# --- a WRITE cut short ------------------------------------------------------------


@pytest.mark.parametrize("close_notify", [False, True], ids=["tcp-close", "tls-close-notify"])
def test_half_written_write_never_reaches_the_volume(env: Env, close_notify: bool) -> None:
    with logged_in(env) as sock:
        peer = local_peer(sock)
        sock.sendall(request(Cmd.WRITE, HEAD, PATTERN_LEN, PATTERN_LEN // 2))
        if close_notify:
            sock.unwrap()
    assert_logged(env, "protocol_error", "mid-frame", peer=peer, client="alice")
    assert env.stats_delta()["protocol_errors"] == 1
    assert_nothing_changed(env)


# --- throttling -------------------------------------------------------------------


def test_repeated_failures_rate_limit_the_peer_and_the_client(
    stack: Stack, caplog: pytest.LogCaptureFixture, certs: Certs
) -> None:
    max_failures = load_config(stack.config_path).login.max_failures
    assert max_failures == 5  # the default the acceptance criterion names
    with ThreadedServer(stack) as ts:  # a fresh stack, as an operator would start it
        env = Env(stack, ts, caplog, certs).arm()
        for _ in range(max_failures):
            with pytest.raises(LoginError) as refused:
                login(env, env.context(), token=WRONG_TOKEN)
            assert refused.value.status is LoginStatus.DENIED
        with pytest.raises(LoginError) as refused:
            login(env, env.context())  # the right token, too late
        assert refused.value.status is LoginStatus.RATE_LIMITED
        assert env.stats_delta()["logins_failed"] == {"denied": max_failures, "rate_limited": 1}
        records = wait_for_records(env, "login_failed", max_failures + 1)
        assert [getattr(r, "status", None) for r in records] == ["DENIED"] * max_failures + [
            "RATE_LIMITED"
        ]
        check_record(records[-1], "too many", status="RATE_LIMITED", client="alice")
        # alice is throttled from every address; another client from another address is not.
        sock, reply = raw_login(env, "alice", source="127.0.0.2")
        sock.close()
        assert reply.status is LoginStatus.RATE_LIMITED
        assert_nothing_changed(env, reader="bob", source="127.0.0.2")
