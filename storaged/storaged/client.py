"""An asyncio client for storaged: what tests and benchmarks use.

Many requests may be outstanding at once (up to the server's
``max_inflight``); replies are matched to callers by handle, in whatever
order the server sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from dataclasses import dataclass

from netblk.protocol.codec import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    HelloReply,
    ProtocolError,
    Reply,
)
from netblk.protocol.constants import Cmd, CmdFlag, Errno, ExportFlag, LoginStatus

READ_CHUNK = 256 << 10


class NetblkError(Exception):
    """Base of the client's errors."""


class LoginError(NetblkError):
    def __init__(self, status: LoginStatus) -> None:
        super().__init__(f"login refused: {status.name}")
        self.status = status


class RequestError(NetblkError):
    def __init__(self, op: Cmd, error: Errno) -> None:
        super().__init__(f"{op.name} failed: {error.name} (errno {int(error)})")
        self.op = op
        self.error = error


class ConnectionLost(NetblkError):
    """The server closed or broke the connection with requests outstanding."""


@dataclass(frozen=True)
class ExportInfo:
    size: int
    block_size: int
    flags: ExportFlag
    max_payload: int
    max_inflight: int

    @property
    def read_only(self) -> bool:
        return bool(self.flags & ExportFlag.READ_ONLY)


class NetblkClient:
    """One logged-in connection to one export."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: ClientConnection,
        info: ExportInfo,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self.info = info
        self._handles = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._slots = asyncio.Semaphore(info.max_inflight)
        self._receiver = asyncio.create_task(self._receive())
        self._failure: BaseException | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        export: str,
        token: bytes,
        server_hostname: str | None = None,
    ) -> NetblkClient:
        """Connect, handshake TLS 1.3 and log in; raises LoginError if refused."""
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname=server_hostname or host
        )
        conn = ClientConnection()
        try:
            writer.write(conn.send_hello(export, token))
            reply = await _next_hello_reply(reader, conn)
        except ConnectionError as exc:
            writer.close()
            raise ConnectionLost(f"server closed the connection during login: {exc}") from exc
        except BaseException:
            writer.close()
            raise
        if reply.status is not LoginStatus.OK:
            writer.close()
            raise LoginError(reply.status)
        info = ExportInfo(
            size=reply.export_size,
            block_size=reply.block_size,
            flags=reply.export_flags,
            max_payload=reply.max_payload,
            max_inflight=reply.max_inflight,
        )
        return cls(reader, writer, conn, info)

    async def _receive(self) -> None:
        try:
            while True:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    self._conn.receive_data(await self._reader.read(READ_CHUNK))
                elif isinstance(event, Reply):
                    future = self._pending.pop(event.handle)
                    if not future.done():
                        future.set_result(event)
                elif isinstance(event, ConnectionClosed):
                    raise ConnectionLost("server closed the connection")
        except (ProtocolError, OSError, ConnectionLost, ssl.SSLError) as exc:
            self._failure = exc
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionLost(str(exc)))
            self._pending.clear()

    async def request(
        self, op: Cmd, offset: int = 0, length: int = 0, *, flags: int = 0, data: bytes = b""
    ) -> bytes:
        """Send one request and wait for its reply; returns READ's data."""
        async with self._slots:
            if self._failure is not None:
                raise ConnectionLost(str(self._failure))
            handle = next(self._handles)
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self._pending[handle] = future
            self._writer.write(self._conn.send_request(op, handle, offset, length, flags))
            if data:
                self._writer.write(data)
            await self._writer.drain()
            reply = await future
        if reply.error is not Errno.OK:
            raise RequestError(op, reply.error)
        return reply.data

    async def read(self, offset: int, length: int) -> bytes:
        return await self.request(Cmd.READ, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = CmdFlag.FUA if fua else 0
        await self.request(Cmd.WRITE, offset, len(data), flags=flags, data=data)

    async def flush(self) -> None:
        await self.request(Cmd.FLUSH)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.request(Cmd.TRIM, offset, length, flags=CmdFlag.FUA if fua else 0)

    async def write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> None:
        flags = (CmdFlag.NO_HOLE if no_hole else 0) | (CmdFlag.FUA if fua else 0)
        await self.request(Cmd.WRITE_ZEROES, offset, length, flags=flags)

    async def close(self) -> None:
        """Send DISCONNECT after outstanding requests and wait for the close."""
        if self._failure is None and not self._writer.is_closing():
            with contextlib.suppress(OSError, ssl.SSLError):
                self._writer.write(self._conn.send_request(Cmd.DISCONNECT, 0))
                await self._writer.drain()
                await asyncio.wait_for(asyncio.shield(self._receiver), timeout=30)
        self._receiver.cancel()
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> NetblkClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _next_hello_reply(reader: asyncio.StreamReader, conn: ClientConnection) -> HelloReply:
    while True:
        event = conn.next_event()
        if isinstance(event, HelloReply):
            return event
        if isinstance(event, ConnectionClosed):
            raise ConnectionLost("server closed the connection during login")
        if event is NEED_DATA:
            conn.receive_data(await reader.read(READ_CHUNK))
