"""Fuzz the live server with hypothesis: hostile bytes before and after login.

Every example runs on a fresh TLS connection to the real server.  The sans-IO
codec, fed the same bytes, predicts what the server must do: the exact replies
(handle and error of every request it can frame, in any order), and whether it
then closes or waits for the rest of an incomplete frame.  The server must
match the prediction within a few seconds -- never hang, never answer
something else.  After all examples the server must still serve a normal
client, no connection may be left open, nothing may have been logged at ERROR,
and a canary written before the fuzzing must be intact.

The canary sits in the middle of the export; fuzzed offsets come from the
first and the last few MiB (and beyond the end), and fuzzed lengths that the
server would accept stay under 2 MiB, so no request the server may validly
carry out can reach the canary -- each example checks that on the prediction.

The client is asyncio (on its own loop, in the test thread) so it reads
replies while it is still sending: a blocking send-everything-then-read
client could deadlock against the server's legitimate backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from netblk.protocol.codec import (
    NEED_DATA,
    ClientConnection,
    Disconnect,
    ExportGeometry,
    HelloReply,
    InvalidRequest,
    ProtocolError,
    Request,
    ServerConnection,
    encode_hello,
    encode_hello_reply,
)
from netblk.protocol.constants import (
    BLOCK_SIZE,
    HELLO,
    HELLO_MAGIC,
    HELLO_REPLY,
    MAX_EXPORT_NAME,
    MAX_PAYLOAD,
    MAX_TOKEN,
    MIN_TOKEN,
    PROTO_VERSION,
    REPLY,
    REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    Cmd,
    Errno,
    LoginStatus,
)
from tests.pki_fixtures import PkiFiles
from tests.storaged.oracle import ALLOWED_FLAGS, MUTATING, RANGED, FrameOracle
from tests.storaged.stack import VOLUME_SIZE, Stack, ThreadedServer

T = TypeVar("T")

#: Fuzzed logins must not lock the test's own client out, and a client that
#: stalls mid-HELLO should not hold a connection for long.
FUZZ_POLICY = "[login]\nmax_failures = 1000000\ntimeout = 60\n"

CANARY_OFFSET = VOLUME_SIZE // 2
CANARY = random.Random(3).randbytes(64 << 10)
#: Fuzzed offsets: [0, LOW_END] and [HIGH_START, 2**64).
LOW_END = 4 << 20
HIGH_START = VOLUME_SIZE - (4 << 20)
#: Fuzzed lengths: up to SMALL_MAX, or more than the whole export.
SMALL_MAX = 2 << 20
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

#: Longest the server may take to answer or close: a healthy one needs
#: milliseconds; the slack is for a loaded CI machine (login runs argon2id).
HANG_LIMIT = 60.0
#: How long an incomplete frame is watched for a (wrong) early answer.
WAIT_PROBE = 0.05
EXAMPLES = 100

assert LOW_END + SMALL_MAX <= CANARY_OFFSET
assert CANARY_OFFSET + len(CANARY) <= HIGH_START


# --- the server under fuzz -------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects ERROR records from any logger (internal errors, asyncio's
    'unhandled exception' reports): bad input must never cause one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Live:
    stack: Stack
    ts: ThreadedServer
    geometry: ExportGeometry
    errors: ErrorLog
    context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        cert, key = self.stack.client_tls("alice")
        self.context = ssl.create_default_context(cafile=self.stack.pki.ca_cert)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.load_cert_chain(cert, key)

    @property
    def hello(self) -> bytes:
        return encode_hello("data", self.stack.tokens["alice"].encode())

    def snapshot(self) -> dict[str, Any]:
        server = self.ts.server
        assert server is not None

        async def take() -> dict[str, Any]:
            return server.snapshot()

        return self.ts.call(take())


async def write_canary(stack: Stack) -> ExportGeometry:
    async with await stack.connect("data", "alice") as alice:
        await alice.write(CANARY_OFFSET, CANARY)
        await alice.flush()
        info = alice.info
    return ExportGeometry(info.size, info.flags, info.max_payload, info.max_inflight)


async def read_canary(stack: Stack) -> bytes:
    async with await stack.connect("data", "alice") as alice:
        return await alice.read(CANARY_OFFSET, len(CANARY))


@pytest.fixture(scope="module")
def fuzz_stack(pki: PkiFiles, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    return Stack(pki=pki, root=tmp_path_factory.mktemp("fuzz"), extra_config=FUZZ_POLICY)


@pytest.fixture
def live(fuzz_stack: Stack) -> Iterator[Live]:
    errors = ErrorLog()
    root = logging.getLogger()
    root.addHandler(errors)
    try:
        with ThreadedServer(fuzz_stack) as ts:
            yield Live(fuzz_stack, ts, ts.call(write_canary(fuzz_stack)), errors)
    finally:
        root.removeHandler(errors)


def assert_survived(live: Live) -> None:
    """After the fuzzing: all connections gone, a normal client served, the
    canary intact, no internal error logged."""
    deadline = time.monotonic() + 60
    while (open_now := live.snapshot()["connections_open"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_now == 0, f"{open_now} fuzz connections still open"
    assert live.ts.call(read_canary(live.stack)) == CANARY
    assert not live.errors.records, [r.getMessage() for r in live.errors.records]


# --- the prediction ----------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """What the server must send: error per handle (and the length of each
    READ's data); then close, or else wait for more bytes."""

    replies: dict[int, tuple[Errno, int]]
    closes: bool
    admitted: list[Request]  # the requests the server will carry out


def predict_session(geometry: ExportGeometry, stream: bytes) -> Prediction:
    conn = ServerConnection(FrameOracle)
    conn.receive_data(encode_hello("data", b"t" * 16))
    conn.next_event()
    conn.accept(geometry)
    conn.receive_data(stream)
    replies: dict[int, tuple[Errno, int]] = {}
    admitted = []
    try:
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, Request):
                replies[event.handle] = (Errno.OK, event.length if event.opcode is Cmd.READ else 0)
                admitted.append(event)
            elif isinstance(event, InvalidRequest):
                replies[event.handle] = (event.error, 0)
            elif isinstance(event, Disconnect):
                return Prediction(replies, True, admitted)
    except ProtocolError:
        return Prediction(replies, True, admitted)
    return Prediction(replies, False, admitted)


def assert_admissible(geometry: ExportGeometry, request: Request) -> None:
    """The protocol's range rules, checked independently of the codec, for
    every request the server will carry out; and the canary is out of reach."""
    if request.opcode not in RANGED:
        assert request.offset == request.length == 0, request
        return
    assert request.length > 0, request
    assert request.offset % BLOCK_SIZE == request.length % BLOCK_SIZE == 0, request
    assert request.offset + request.length <= geometry.size, request
    if request.opcode in (Cmd.READ, Cmd.WRITE):
        assert request.length <= geometry.max_payload, request
    assert len(request.data) == (request.length if request.opcode is Cmd.WRITE else 0)
    if request.opcode in MUTATING:
        end = request.offset + request.length
        assert end <= CANARY_OFFSET or request.offset >= CANARY_OFFSET + len(CANARY), request


def predict_login(first: bytes) -> bytes | None:
    """The exact bytes the server sends before closing, or None if it must
    wait for the rest of the HELLO.  A well-formed HELLO from a random token
    is refused with DENIED (the fuzz server never rate-limits)."""
    conn = ServerConnection(FrameOracle)
    conn.receive_data(first)
    try:
        event = conn.next_event()
    except ProtocolError as exc:
        return exc.reply
    if event is NEED_DATA:
        return None
    # docs/protocol.md: every field but the status is zero on a refusal
    return encode_hello_reply(HelloReply(status=LoginStatus.DENIED, block_size=0, max_payload=0))


# --- the client ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connection(
    live: Live,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", live.stack.port, ssl=live.context, server_hostname="localhost"
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def read_to_close(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """All bytes until the server closes, and whether it closed cleanly (not reset)."""
    chunks = []
    try:
        while chunk := await reader.read(1 << 16):
            chunks.append(chunk)
    except (ConnectionError, ssl.SSLError):
        return b"".join(chunks), False
    return b"".join(chunks), True


async def first_frame_exchange(live: Live, first: bytes) -> None:
    expected = predict_login(first)
    event("waits" if expected is None else f"closes after {len(expected)} bytes")
    async with asyncio.timeout(HANG_LIMIT), connection(live) as (reader, writer):
        writer.write(first)
        if expected is None:
            with contextlib.suppress(TimeoutError):
                early = await asyncio.wait_for(reader.read(1 << 16), WAIT_PROBE)
                raise AssertionError(f"server answered an incomplete HELLO with {early!r}")
            return
        answer, clean = await read_to_close(reader)
    assert answer == expected if clean else expected.startswith(answer), (answer, expected)


async def collect_replies(
    reader: asyncio.StreamReader, prediction: Prediction
) -> tuple[dict[int, Errno], str]:
    """Parse replies as the prediction says they must look; returns them and
    how the exchange ended: "eof", "reset" or "open" (all replies, no close)."""
    got: dict[int, Errno] = {}
    buf = bytearray()
    while len(got) < len(prediction.replies) or prediction.closes:
        try:
            chunk = await reader.read(1 << 20)
        except (ConnectionError, ssl.SSLError):
            return got, "reset"
        if not chunk:
            assert not buf, f"server closed mid-reply ({len(buf)} bytes)"
            return got, "eof"
        buf += chunk
        while len(buf) >= REPLY.size:
            magic, error, handle = REPLY.layout.unpack_from(buf)
            assert magic == REPLY_MAGIC, hex(magic)
            assert handle in prediction.replies, f"reply for unexpected handle {handle:#x}"
            assert handle not in got, f"second reply for handle {handle:#x}"
            errno = Errno(error)
            _, data_len = prediction.replies[handle]
            size = REPLY.size + (data_len if errno is Errno.OK else 0)
            if len(buf) < size:
                break
            got[handle] = errno
            del buf[:size]
    assert not buf, f"{len(buf)} bytes after the last expected reply"
    return got, "open"


async def session_exchange(live: Live, stream: bytes) -> None:
    prediction = predict_session(live.geometry, stream)
    for request in prediction.admitted:
        assert_admissible(live.geometry, request)
    async with asyncio.timeout(HANG_LIMIT), connection(live) as (reader, writer):
        writer.write(live.hello)
        login = ClientConnection()
        login.receive_data(await reader.readexactly(HELLO_REPLY.size))
        reply = login.next_event()
        assert isinstance(reply, HelloReply) and reply.status is LoginStatus.OK, reply
        writer.write(stream)
        got, ending = await collect_replies(reader, prediction)
    expected = {handle: error for handle, (error, _) in prediction.replies.items()}
    event(f"ending: {ending}")
    for error in expected.values():
        event(f"reply: {error.name}")
    if ending == "reset":  # a reset may cost replies still in flight, never alter them
        assert got.items() <= expected.items()
    else:
        assert got == expected
    assert (ending != "open") == prediction.closes, ending


# --- strategies -----------------------------------------------------------------------


def mostly(usual: T, *unusual: st.SearchStrategy[T], odds: int = 4) -> st.SearchStrategy[T]:
    """``usual`` but one time in ``odds`` one of ``unusual``: a frame gets past
    the first checks often enough to reach the deeper ones."""
    return st.sampled_from(range(odds)).flatmap(
        lambda n: st.just(usual) if n else st.one_of(*unusual)
    )


def aligned(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low // BLOCK_SIZE, high // BLOCK_SIZE).map(lambda n: n * BLOCK_SIZE)


#: Block-aligned offsets where a request of up to 64 blocks may straddle the end.
NEAR_END = aligned(VOLUME_SIZE - 64 * BLOCK_SIZE, VOLUME_SIZE)


OFFSETS = st.one_of(
    NEAR_END,
    aligned(0, LOW_END),
    aligned(HIGH_START, VOLUME_SIZE + LOW_END),
    st.integers(0, LOW_END),
    st.integers(HIGH_START, U64),
    st.sampled_from([VOLUME_SIZE - BLOCK_SIZE, VOLUME_SIZE, 2**63, U64 + 1 - BLOCK_SIZE, U64]),
)
LENGTHS = st.one_of(
    aligned(0, 64 * BLOCK_SIZE),
    aligned(0, SMALL_MAX),
    st.integers(0, SMALL_MAX),
    st.sampled_from([MAX_PAYLOAD, MAX_PAYLOAD + BLOCK_SIZE, U32 + 1 - BLOCK_SIZE, U32]),
    st.integers(VOLUME_SIZE + 1, U32),
)
#: How each request field but the magic can be made hostile.
HOSTILE_FIELDS: dict[str, st.SearchStrategy[int]] = {
    "flags": st.integers(0, U16),
    "opcode": st.one_of(st.sampled_from(list(Cmd)), st.integers(0, U16)),
    "offset": OFFSETS,
    "length": LENGTHS,
    "reserved": st.integers(1, U32),
}


@st.composite
def request_frames(draw: st.DrawFn, handle: int) -> bytes:
    """A plausible request with up to three fields made hostile, and maybe a
    payload of the wrong size (which desynchronises the framing on purpose)."""
    opcode = draw(st.sampled_from([*Cmd, Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]))
    ranged = opcode in RANGED
    fields: dict[str, int] = {
        "magic": draw(mostly(REQUEST_MAGIC, st.integers(0, U32), odds=8)),
        "flags": draw(st.sampled_from([0, int(ALLOWED_FLAGS[opcode])])),
        "opcode": opcode,
        "offset": draw(st.one_of(aligned(0, LOW_END), aligned(HIGH_START, VOLUME_SIZE), NEAR_END))
        if ranged
        else 0,
        "length": draw(aligned(BLOCK_SIZE, 64 * BLOCK_SIZE)) if ranged else 0,
        "reserved": 0,
    }
    for name in draw(st.sets(st.sampled_from(sorted(HOSTILE_FIELDS)), max_size=3)):
        fields[name] = draw(HOSTILE_FIELDS[name])
    header: bytes = REQUEST.layout.pack(
        fields["magic"],
        fields["flags"],
        fields["opcode"],
        handle,
        fields["offset"],
        fields["length"],
        fields["reserved"],
    )
    if fields["opcode"] != Cmd.WRITE:
        return header
    honest = min(fields["length"], MAX_PAYLOAD)
    payload_len = draw(mostly(honest, st.integers(0, 3 * BLOCK_SIZE)))
    return header + bytes([draw(st.integers(0, 255))]) * payload_len


JUNK = st.binary(min_size=1, max_size=256).filter(
    lambda b: not b.startswith(REQUEST_MAGIC.to_bytes(4, "big"))
)


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    """A few frames on one connection, with distinct handles (a reused handle
    is legal or not depending on timing, so the prediction could not tell)."""
    count = draw(st.integers(1, 6))
    handles = draw(st.lists(st.integers(0, U64), min_size=count, max_size=count, unique=True))
    junk: st.SearchStrategy[bytes | None] = JUNK
    frames = [
        draw(mostly(None, junk, odds=8)) or draw(request_frames(handle)) for handle in handles
    ]
    return b"".join(frames)


#: How each HELLO field can be made hostile; "cut" ends the frame early.
HOSTILE_HELLO: dict[str, st.SearchStrategy[int]] = {
    "magic": st.integers(0, U32),
    "version": st.one_of(st.sampled_from([0, PROTO_VERSION + 1]), st.integers(0, U16)),
    "flags": st.integers(1, U16),
    "export_len": st.integers(0, U16),
    "token_len": st.integers(0, U16),
    "reserved": st.integers(1, U32),
    "cut": st.integers(1, HELLO.size + MAX_EXPORT_NAME + MAX_TOKEN),
}


@st.composite
def hellos(draw: st.DrawFn) -> bytes:
    """A HELLO with odd names and tokens and up to three hostile fields
    (lengths that lie, a frame cut short)."""
    name = draw(
        mostly(
            b"data",
            st.sampled_from([b"other", b"nosuch", b"../data", b"data/x", b".data", b"-x"]),
            st.binary(max_size=MAX_EXPORT_NAME + 4),
        )
    )
    token = draw(
        mostly(
            b"t" * 43,
            st.sampled_from([b"\xff" * 32, b"t" * MIN_TOKEN, b"t" * MAX_TOKEN, "é".encode() * 20]),
            st.binary(min_size=MIN_TOKEN, max_size=MAX_TOKEN),
            st.binary(max_size=MAX_TOKEN + 4),
        )
    )
    fields = {
        "magic": HELLO_MAGIC,
        "version": PROTO_VERSION,
        "flags": 0,
        "export_len": len(name),
        "token_len": len(token),
        "reserved": 0,
        "cut": U32,
    }
    for key in draw(st.sets(st.sampled_from(sorted(HOSTILE_HELLO)), max_size=3)):
        fields[key] = draw(HOSTILE_HELLO[key])
    header: bytes = HELLO.layout.pack(*(fields[key] for key in HELLO.fields))
    frame = header + name + token + draw(mostly(b"", st.binary(max_size=64)))
    return frame[: fields["cut"]]


FIRST_FRAMES = st.one_of(
    st.binary(min_size=1, max_size=512),
    st.binary(max_size=512).map(lambda b: HELLO_MAGIC.to_bytes(4, "big") + b),
    hellos(),
    hellos(),
    hellos(),
)
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the tests ------------------------------------------------------------------------


def test_random_first_frame(live: Live) -> None:
    """Before login: random bytes, the HELLO magic then noise, or a HELLO with
    hostile fields.  The server sends exactly the refusal the codec predicts
    and closes, or waits for the rest of an incomplete HELLO."""

    @FUZZ_SETTINGS
    @given(first=FIRST_FRAMES)
    def example(first: bytes) -> None:
        asyncio.run(first_frame_exchange(live, first))

    example()
    assert_survived(live)


def test_hostile_frames_after_login(live: Live) -> None:
    """After a valid login: random sequences of hostile request frames and
    junk.  The server answers each framed request with the predicted error
    (or success), closes on a framing error or DISCONNECT, and waits on an
    incomplete frame."""

    @FUZZ_SETTINGS
    @given(stream=sessions())
    def example(stream: bytes) -> None:
        asyncio.run(session_exchange(live, stream))

    example()
    assert_survived(live)
