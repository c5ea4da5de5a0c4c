"""Sans-IO netblk protocol: bytes in, events out (docs/protocol.md).

``ServerConnection`` and ``ClientConnection`` hold no sockets, run no
requests and do no I/O; storaged's sessions, tls-bridge, the client library
(storaged.client) and the tests feed them bytes and act on the events.  The
codec owns the HELLO and login state, the events and the client side.  A
server's request frames are decoded and checked by the ``FrameScanner`` it
gives its ``ServerConnection`` (storaged's engine: the one implementation of
those rules), so every shell refuses the same frames the same way.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

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
    CmdFlag,
    Errno,
    ExportFlag,
    LoginStatus,
)
from netblk.protocol.names import validate_export_name

NO_EXPORT_FLAGS = ExportFlag(0)

_CMDS: dict[int, Cmd] = {int(cmd): cmd for cmd in Cmd}
_CMD_FLAGS: dict[int, CmdFlag] = {}


def _cmd_flags(bits: int) -> CmdFlag:
    """``CmdFlag(bits)`` memoized: constructing a flag by value is slow."""
    flags = _CMD_FLAGS.get(bits)
    if flags is None:
        flags = _CMD_FLAGS[bits] = CmdFlag(bits)
    return flags


class FrameKind(enum.IntEnum):
    """What a request frame is, as a ``FrameScanner`` reports it."""

    SHORT = 0  # not yet whole
    REQUEST = 1  # valid
    INVALID = 2  # well framed, to be refused with its error
    DISCONNECT = 3
    BROKEN = 4  # the stream is broken: close


class ScannedFrame(NamedTuple):
    """One request frame decoded and checked; it takes ``size`` bytes."""

    kind: int
    size: int
    opcode: int
    flags: int
    handle: int
    offset: int
    length: int
    error: int
    reason: str


class FrameScanner(Protocol):
    """Decodes and checks request frames against an export (storaged's
    engine, ``storaged._engine.Scanner``, is the implementation; the
    codec holds the only state it needs: which handles are in flight).

    ``scan`` decodes the frame at ``start`` of ``buffer`` without consuming
    it and marks a REQUEST's or INVALID's handle in flight; ``answer``
    encodes a reply header and ends its handle's flight."""

    @property
    def inflight(self) -> int: ...
    def scan(
        self, buffer: bytearray, start: int, /
    ) -> tuple[int, int, int, int, int, int, int, int, str]: ...
    def answer(self, handle: int, error: int, /) -> bytes: ...


#: Makes the scanner for an export a client was admitted to.
ScannerFactory = Callable[["ExportGeometry"], FrameScanner]


class ProtocolError(Exception):
    """The peer broke the framing; the connection must be closed.

    ``reply`` holds the bytes to send before closing (a HELLO reply with a
    status during login), or ``b""`` when the stream can't be answered.
    """

    def __init__(self, reason: str, reply: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class NeedData(enum.Enum):
    """Sentinel: no complete event yet, feed more bytes."""

    NEED_DATA = enum.auto()


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed cleanly at a frame boundary."""


@dataclass(frozen=True, slots=True)
class Hello:
    """A client's login request."""

    version: int
    export: str
    token: bytes


@dataclass(frozen=True, slots=True)
class HelloReply:
    """The server's answer to HELLO; anything but OK ends the connection."""

    status: LoginStatus
    version: int = PROTO_VERSION
    export_size: int = 0
    block_size: int = BLOCK_SIZE
    max_payload: int = MAX_PAYLOAD
    export_flags: ExportFlag = NO_EXPORT_FLAGS
    max_inflight: int = 0


class Request(NamedTuple):
    """A valid request; ``data`` is the WRITE payload, else empty.

    A NamedTuple, not a frozen dataclass: one is made per request, and a
    frozen dataclass's ``__init__`` costs twice as much (768 against 327 ns
    on the development host)."""

    opcode: Cmd
    flags: CmdFlag
    handle: int
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class InvalidRequest:
    """A well-framed request the server must refuse with ``error``."""

    handle: int
    opcode: int
    error: Errno
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client asked to end the session after its in-flight requests."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The server's answer to one request; ``data`` is READ's payload."""

    handle: int
    error: Errno
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ExportGeometry:
    """What the server validates requests against after login."""

    size: int
    flags: ExportFlag
    max_payload: int = MAX_PAYLOAD
    max_inflight: int = 64


ServerEvent = Hello | Request | InvalidRequest | Disconnect | ConnectionClosed
ClientEvent = HelloReply | Reply | ConnectionClosed


def encode_hello(export: str, token: bytes, version: int = PROTO_VERSION) -> bytes:
    """Encode a HELLO frame (no validation: tests send bad ones on purpose)."""
    name = export.encode()
    return HELLO.layout.pack(HELLO_MAGIC, version, 0, len(name), len(token), 0) + name + token


def encode_hello_reply(reply: HelloReply) -> bytes:
    return HELLO_REPLY.layout.pack(
        HELLO_MAGIC,
        reply.version,
        reply.status,
        reply.export_size,
        reply.block_size,
        reply.max_payload,
        reply.export_flags,
        reply.max_inflight,
    )


def encode_request(
    opcode: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0
) -> bytes:
    """Encode a request header; a WRITE's payload follows it on the wire."""
    return REQUEST.layout.pack(REQUEST_MAGIC, flags, opcode, handle, offset, length, 0)


def encode_reply(handle: int, error: int) -> bytes:
    """Encode a reply header; a successful READ's data follows it."""
    return REPLY.layout.pack(REPLY_MAGIC, error, handle)


class _Buffer:
    """Receive buffer that hands out frames without quadratic copying, and
    knows whether the peer has closed."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._pos = 0
        self.eof = False

    def __len__(self) -> int:
        return len(self._data) - self._pos

    def feed(self, data: bytes) -> None:
        """Append bytes from the peer; ``b""`` means the peer closed."""
        if not data:
            self.eof = True
            return
        if self._pos and self._pos == len(self._data):
            self._data.clear()
            self._pos = 0
        self._data += data

    def front(self) -> tuple[bytearray, int]:
        """The bytes received and where the unconsumed ones start."""
        return self._data, self._pos

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        """Decode the fixed header at the front, without consuming it."""
        return layout.unpack_from(self._data, self._pos)

    def end(self, peer: str) -> ConnectionClosed | NeedData:
        """What a frame that needs more bytes means: wait, a clean close, or
        (bytes left over at EOF) a broken frame."""
        if not self.eof:
            return NEED_DATA
        if len(self):
            raise ProtocolError(f"{peer} closed mid-frame ({len(self)} bytes pending)")
        return ConnectionClosed()

    def take(self, size: int) -> bytes:
        chunk = bytes(memoryview(self._data)[self._pos : self._pos + size])
        self.skip(size)
        return chunk

    def skip(self, size: int) -> None:
        self._pos += size
        if self._pos > len(self._data) // 2:
            del self._data[: self._pos]
            self._pos = 0


class _State(enum.Enum):
    AWAIT_HELLO = enum.auto()
    AWAIT_LOGIN_DECISION = enum.auto()
    SERVING = enum.auto()
    DISCONNECTING = enum.auto()
    CLOSED = enum.auto()


class ServerConnection:
    """Server side of one connection: one HELLO, then requests.

    After ``Hello`` the caller decides and calls ``accept`` (which returns the
    reply to send and makes the request scanner for the export) or
    ``refuse``.  Request frames are decoded and checked by that scanner
    (``scanner`` makes it: storaged's engine), so every shell refuses the
    same frames the same way.  A shell that runs requests itself (storaged)
    hands the scanner and the buffered bytes to its engine: ``frames``,
    ``consume``.
    """

    def __init__(self, scanner: ScannerFactory) -> None:
        self._buf = _Buffer()
        self._state = _State.AWAIT_HELLO
        self._make_scanner = scanner
        self._scanner: FrameScanner | None = None

    @property
    def scanner(self) -> FrameScanner:
        """The accepted export's request scanner."""
        if self._scanner is None:
            raise RuntimeError("no export accepted yet")
        return self._scanner

    @property
    def inflight(self) -> int:
        """Requests handed out and not yet answered."""
        return self._scanner.inflight if self._scanner is not None else 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed."""
        self._buf.feed(data)

    def frames(self) -> tuple[bytearray, int]:
        """The receive buffer and where its unconsumed bytes start, for an
        engine that takes request frames itself (then ``consume`` them)."""
        if self._state is not _State.SERVING:
            raise RuntimeError("requests before login")
        return self._buf.front()

    def consume(self, size: int) -> None:
        """Drop ``size`` bytes an engine took from the front of ``frames``."""
        self._buf.skip(size)

    def accept(self, geometry: ExportGeometry) -> bytes:
        """Admit the client to an export; returns the HELLO reply to send."""
        if self._state is not _State.AWAIT_LOGIN_DECISION:
            raise RuntimeError("accept() without a pending HELLO")
        self._scanner = self._make_scanner(geometry)
        self._state = _State.SERVING
        return encode_hello_reply(
            HelloReply(
                status=LoginStatus.OK,
                export_size=geometry.size,
                export_flags=geometry.flags,
                max_payload=geometry.max_payload,
                max_inflight=geometry.max_inflight,
            )
        )

    def refuse(self, status: LoginStatus) -> bytes:
        """Refuse the login; returns the reply to send before closing."""
        if status is LoginStatus.OK:
            raise ValueError("refuse() needs a failure status")
        self._state = _State.CLOSED
        # Nothing but the status: no size, block size, payload or flags.
        return encode_hello_reply(HelloReply(status=status, block_size=0, max_payload=0))

    def send_reply(self, handle: int, error: Errno) -> bytes:
        """Answer a request (header only; a READ's data is sent after it)."""
        return self.scanner.answer(handle, error)

    def next_event(self) -> ServerEvent | NeedData:
        """Parse the next event, or NEED_DATA.  Raises ProtocolError."""
        if self._state is _State.AWAIT_HELLO:
            return self._next_hello()
        if self._state is _State.SERVING:
            return self._next_request()
        return NEED_DATA if not self._buf.eof else ConnectionClosed()

    def events(self) -> Iterator[ServerEvent]:
        """Every complete event buffered so far."""
        while not isinstance(event := self.next_event(), NeedData):
            yield event
            if isinstance(event, ConnectionClosed | Disconnect | Hello):
                return

    def _closed_or_need_data(self) -> ConnectionClosed | NeedData:
        if self._buf.eof:
            self._state = _State.CLOSED
        return self._buf.end("peer")

    def _next_hello(self) -> Hello | ConnectionClosed | NeedData:
        if len(self._buf) < HELLO.size:
            return self._closed_or_need_data()
        magic, version, flags, export_len, token_len, reserved = self._buf.unpack(HELLO.layout)
        if magic != HELLO_MAGIC:
            self._state = _State.CLOSED
            raise ProtocolError(f"bad HELLO magic {magic:#010x}")
        if version != PROTO_VERSION:
            raise self._refusal(LoginStatus.BAD_VERSION, f"unsupported version {version}")
        if flags or reserved:
            raise self._refusal(LoginStatus.BAD_REQUEST, "non-zero HELLO flags or reserved")
        if not 0 < export_len <= MAX_EXPORT_NAME:
            raise self._refusal(LoginStatus.BAD_REQUEST, f"export name length {export_len}")
        if not MIN_TOKEN <= token_len <= MAX_TOKEN:
            raise self._refusal(LoginStatus.BAD_REQUEST, f"token length {token_len}")
        if len(self._buf) < HELLO.size + export_len + token_len:
            return self._closed_or_need_data()
        self._buf.skip(HELLO.size)
        raw_name = self._buf.take(export_len)
        token = self._buf.take(token_len)
        try:
            export = validate_export_name(raw_name.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._refusal(LoginStatus.BAD_REQUEST, f"export name: {exc}") from None
        self._state = _State.AWAIT_LOGIN_DECISION
        return Hello(version=version, export=export, token=token)

    def _refusal(self, status: LoginStatus, reason: str) -> ProtocolError:
        return ProtocolError(reason, reply=self.refuse(status))

    def _next_request(self) -> Request | InvalidRequest | Disconnect | ConnectionClosed | NeedData:
        data, start = self._buf.front()
        frame = ScannedFrame(*self.scanner.scan(data, start))
        if frame.kind == FrameKind.SHORT:
            return self._closed_or_need_data()
        if frame.kind == FrameKind.BROKEN:
            self._state = _State.CLOSED
            raise ProtocolError(frame.reason)
        self._buf.skip(frame.size - frame.length if frame.opcode == Cmd.WRITE else frame.size)
        payload = self._buf.take(frame.length) if frame.opcode == Cmd.WRITE else b""
        if frame.kind == FrameKind.INVALID:
            return InvalidRequest(
                handle=frame.handle,
                opcode=frame.opcode,
                error=Errno(frame.error),
                reason=frame.reason,
            )
        if frame.kind == FrameKind.DISCONNECT:
            self._state = _State.DISCONNECTING
            return Disconnect()
        return Request(
            _CMDS[frame.opcode],
            _cmd_flags(frame.flags),
            frame.handle,
            frame.offset,
            frame.length,
            payload,
        )


class ClientConnection:
    """Client side of one connection: HELLO, then tagged requests.

    Tracks which handles are outstanding and how long each READ is, since a
    READ reply carries no length of its own.
    """

    def __init__(self) -> None:
        self._buf = _Buffer()
        self._logged_in = False
        self._read_lengths: dict[int, int] = {}
        self._outstanding: set[int] = set()

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def send_hello(self, export: str, token: bytes) -> bytes:
        validate_export_name(export)
        if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
            raise ValueError(f"token must be {MIN_TOKEN}..{MAX_TOKEN} bytes")
        return encode_hello(export, token)

    def send_request(
        self, opcode: Cmd, handle: int, offset: int = 0, length: int = 0, flags: int = 0
    ) -> bytes:
        """Encode a request header and remember the handle (send WRITE data after it)."""
        if handle in self._outstanding:
            raise ValueError(f"handle {handle:#x} is already outstanding")
        if opcode is not Cmd.DISCONNECT:
            self._outstanding.add(handle)
        if opcode is Cmd.READ:
            self._read_lengths[handle] = length
        return encode_request(opcode, handle, offset, length, flags)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means it closed."""
        self._buf.feed(data)

    def next_event(self) -> ClientEvent | NeedData:
        """Parse the next event, or NEED_DATA.  Raises ProtocolError."""
        if not self._logged_in:
            return self._next_hello_reply()
        if len(self._buf) < REPLY.size:
            return self._closed_or_need_data()
        magic, error, handle = self._buf.unpack(REPLY.layout)
        if magic != REPLY_MAGIC:
            raise ProtocolError(f"bad reply magic {magic:#010x}")
        if handle not in self._outstanding:
            raise ProtocolError(f"reply for unknown handle {handle:#x}")
        try:
            errno = Errno(error)
        except ValueError:
            raise ProtocolError(f"unknown error code {error}") from None
        data_len = self._read_lengths.get(handle, 0) if errno is Errno.OK else 0
        if len(self._buf) < REPLY.size + data_len:
            return self._closed_or_need_data()
        self._buf.skip(REPLY.size)
        data = self._buf.take(data_len) if data_len else b""
        self._outstanding.discard(handle)
        self._read_lengths.pop(handle, None)
        return Reply(handle=handle, error=errno, data=data)

    def _next_hello_reply(self) -> HelloReply | ConnectionClosed | NeedData:
        if len(self._buf) < HELLO_REPLY.size:
            return self._closed_or_need_data()
        (magic, version, status, size, block_size, max_payload, flags, max_inflight) = (
            self._buf.unpack(HELLO_REPLY.layout)
        )
        self._buf.skip(HELLO_REPLY.size)
        if magic != HELLO_MAGIC:
            raise ProtocolError(f"bad HELLO reply magic {magic:#010x}")
        try:
            login = LoginStatus(status)
        except ValueError:
            raise ProtocolError(f"unknown login status {status}") from None
        self._logged_in = login is LoginStatus.OK
        return HelloReply(
            status=login,
            version=version,
            export_size=size,
            block_size=block_size,
            max_payload=max_payload,
            export_flags=ExportFlag(flags),
            max_inflight=max_inflight,
        )

    def _closed_or_need_data(self) -> ConnectionClosed | NeedData:
        return self._buf.end("server")
