"""An asyncio client for storaged: what tests and benchmarks use.

Many requests may be outstanding at once (up to the server's
``max_inflight``); replies are matched to callers by handle, in whatever
order the server sends them.  ``NetblkClient`` is one connection;
``FailoverClient`` does what netblk.ko does with a server list: on a lost
connection or a request timeout it reconnects through the next server and
sends the unanswered requests again, until a dead timeout.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from netblk.addresses import host_port
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
#: FailoverClient's pause after a whole round of servers failed, doubling.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0


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


class Requests(abc.ABC):
    """The requests by name, on top of a client's ``request``."""

    @abc.abstractmethod
    async def request(
        self, op: Cmd, offset: int = 0, length: int = 0, *, flags: int = 0, data: bytes = b""
    ) -> bytes:
        """Send one request and wait for its reply; returns READ's data."""

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


class NetblkClient(Requests):
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

    def abort(self) -> None:
        """Drop the connection at once, without DISCONNECT."""
        self._receiver.cancel()
        transport = self._writer.transport
        transport.abort()

    async def __aenter__(self) -> NetblkClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


@dataclass(frozen=True)
class Server:
    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


class FailoverClient(Requests):
    """One export through a list of servers, like netblk.ko's ``servers``.

    A request that times out or whose connection is lost is sent again on
    the next connection; connecting walks the list from the server after
    the one that failed, a login answered UNAVAILABLE (a standby) moving
    on at once, with a backoff after each whole round.  Requests fail with
    ConnectionLost once ``dead_timeout`` passes without a connection.
    """

    def __init__(
        self,
        servers: Sequence[Server],
        *,
        ssl_context: ssl.SSLContext,
        export: str,
        token: bytes,
        server_hostname: str | None = None,
        request_timeout: float = 30.0,
        dead_timeout: float = 30.0,
    ) -> None:
        if not servers:
            raise ValueError("no servers")
        self.servers = tuple(servers)
        self._ssl_context = ssl_context
        self._export = export
        self._token = token
        self._server_hostname = server_hostname
        self.request_timeout = request_timeout
        self.dead_timeout = dead_timeout
        self._client: NetblkClient | None = None
        self._lock = asyncio.Lock()
        self._next = 0
        #: The server of the current connection, and how often a new
        #: connection went to another server than the one before.
        self.current: Server | None = None
        self.failovers = 0
        self.reconnects = 0

    @property
    def info(self) -> ExportInfo:
        assert self._client is not None
        return self._client.info

    async def connect(self) -> FailoverClient:
        await self._connection()
        return self

    async def _connection(self) -> NetblkClient:
        async with self._lock:
            if self._client is None:
                self._client = await self._connect_any()
            return self._client

    async def _connect_any(self) -> NetblkClient:
        deadline = asyncio.get_running_loop().time() + self.dead_timeout
        backoff = BACKOFF_MIN
        last: BaseException | None = None
        while True:
            for _ in self.servers:
                server = self.servers[self._next]
                self._next = (self._next + 1) % len(self.servers)
                try:
                    client = await asyncio.wait_for(
                        NetblkClient.connect(
                            server.host,
                            server.port,
                            ssl_context=self._ssl_context,
                            export=self._export,
                            token=self._token,
                            server_hostname=self._server_hostname,
                        ),
                        self.request_timeout,
                    )
                except LoginError as exc:
                    if exc.status not in (LoginStatus.UNAVAILABLE, LoginStatus.RATE_LIMITED):
                        raise
                    last = exc
                except (OSError, ssl.SSLError, ConnectionLost, TimeoutError) as exc:
                    last = exc
                else:
                    if self.current is not None and server != self.current:
                        self.failovers += 1
                    self.current = server
                    self._next = self.servers.index(server)  # stay while it serves
                    return client
            if asyncio.get_running_loop().time() + backoff > deadline:
                raise ConnectionLost(f"no server answered within {self.dead_timeout} s: {last}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _lost(self, client: NetblkClient) -> None:
        """``client``'s connection failed: the next request reconnects."""
        async with self._lock:
            if self._client is client:
                self._client = None
                self.reconnects += 1
                self._next = (self._next + 1) % len(self.servers)
                client.abort()

    async def request(
        self, op: Cmd, offset: int = 0, length: int = 0, *, flags: int = 0, data: bytes = b""
    ) -> bytes:
        """Send one request, again on the next connection if need be."""
        while True:
            client = await self._connection()
            try:
                return await asyncio.wait_for(
                    client.request(op, offset, length, flags=flags, data=data),
                    self.request_timeout,
                )
            except (ConnectionLost, TimeoutError):
                await self._lost(client)

    async def close(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.close()
                self._client = None

    async def __aenter__(self) -> FailoverClient:
        return await self.connect()

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
