"""One client connection: TLS handshake, login, then pipelined requests.

A thin I/O shell around ``protocol.codec.ServerConnection``.  Requests run
on the worker pool and complete out of order; this loop stops reading while
too many requests or bytes are in flight or the peer is slow to take
replies, which bounds a connection's memory (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

from storaged.config import Access
from storaged.engine import Outcome, execute
from storaged.login import Gatekeeper
from storaged.protocol.codec import (
    NEED_DATA,
    ConnectionClosed,
    Disconnect,
    ExportGeometry,
    Hello,
    InvalidRequest,
    ProtocolError,
    Request,
    ServerConnection,
)
from storaged.protocol.constants import Cmd, Errno, ExportFlag, LoginStatus
from storaged.stats import ServerStats
from storaged.tlsconf import describe_tls_error, peer_common_name
from storaged.volume import Volume

log = logging.getLogger(__name__)

#: Bytes asked of the socket per read.
READ_CHUNK = 256 << 10
#: Stop reading requests while this many reply bytes wait to be sent.
WRITE_HIGH_WATER = 4 << 20


@dataclass(frozen=True)
class Export:
    """An export as sessions see it: its volume and what it offers."""

    name: str
    volume: Volume
    flags: ExportFlag


@dataclass(frozen=True)
class SessionLimits:
    max_inflight: int
    max_inflight_bytes: int
    max_payload: int
    login_timeout: float


class Session:
    """Serves one accepted TCP connection until it ends or the server stops."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        tls: ssl.SSLContext,
        gatekeeper: Gatekeeper,
        exports: Mapping[str, Export],
        limits: SessionLimits,
        pool: Executor,
        stats: ServerStats,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._tls = tls
        self._gatekeeper = gatekeeper
        self._exports = exports
        self._limits = limits
        self._pool = pool
        self._stats = stats
        self._conn = ServerConnection()
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        self._peer_host = str(peer[0])
        self.client: str | None = None
        self._export: Export | None = None
        self._inflight_bytes = 0
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._flush_on_close = False

    def _log(self, level: int, msg: str, event: str, **fields: object) -> None:
        extra = {"event": event, "peer": self.peer, "client": self.client}
        if self._export is not None:
            extra["export"] = self._export.name
        log.log(level, msg, extra=extra | fields)

    def stop(self) -> None:
        """Stop taking requests (server shutdown); in-flight ones finish."""
        self._stopping = True
        transport = self._writer.transport
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            transport.pause_reading()
        self._reader.feed_eof()

    async def run(self) -> None:
        try:
            if await self._login():
                await self._serve()
        except ProtocolError as exc:
            self._stats.protocol_errors += 1
            level = logging.INFO if self._stopping else logging.WARNING
            self._log(level, "protocol error, closing", "protocol_error", reason=exc.reason)
            if exc.reply:
                self._writer.write(exc.reply)
        except (ConnectionError, ssl.SSLError) as exc:
            self._log(logging.INFO, "connection lost", "connection_lost", reason=str(exc))
        except Exception:  # a bug must cost one connection, never the server
            self._log(logging.ERROR, "internal error, closing", "internal_error", exc_info=True)
        finally:
            await self._idle.wait()
            if self._flush_on_close and self._export is not None:
                await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._export.volume.flush
                )
            await self._close()

    async def _login(self) -> bool:
        try:
            async with asyncio.timeout(self._limits.login_timeout):
                await self._writer.start_tls(self._tls)
                hello = await self._read_hello()
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = describe_tls_error(exc)
            self._stats.logins_failed["tls"] += 1
            self._gatekeeper.throttle.record_failure(f"peer:{self._peer_host}", time.monotonic())
            self._log(
                logging.WARNING, "TLS handshake or login failed", "login_failed", reason=reason
            )
            return False
        if hello is None:
            return False
        identity = peer_common_name(self._writer.get_extra_info("peercert"))
        loop = asyncio.get_running_loop()
        decision = await loop.run_in_executor(
            self._pool,
            self._gatekeeper.decide,
            self._peer_host,
            identity,
            hello.export,
            hello.token,
            time.monotonic(),
        )
        self.client = identity
        if decision.status is not LoginStatus.OK:
            self._stats.logins_failed[decision.status.name.lower()] += 1
            self._log(
                logging.WARNING,
                "login refused",
                "login_failed",
                status=decision.status.name,
                reason=decision.reason,
                requested_export=hello.export,
            )
            self._writer.write(self._conn.refuse(decision.status))
            return False
        export = self._exports[hello.export]
        flags = export.flags
        if decision.access is Access.RO:
            flags |= ExportFlag.READ_ONLY
        self._export = export
        self._writer.write(
            self._conn.accept(
                ExportGeometry(
                    size=export.volume.size,
                    flags=flags,
                    max_payload=self._limits.max_payload,
                    max_inflight=self._limits.max_inflight,
                )
            )
        )
        self._stats.logins_ok += 1
        self._log(logging.INFO, "client logged in", "login_ok", access=decision.access.value)
        return True

    async def _read_hello(self) -> Hello | None:
        while True:
            event = self._conn.next_event()
            if isinstance(event, Hello):
                return event
            if isinstance(event, ConnectionClosed):
                self._log(logging.INFO, "closed before login", "login_abandoned")
                return None
            self._conn.receive_data(await self._reader.read(READ_CHUNK))

    async def _serve(self) -> None:
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                self._conn.receive_data(await self._reader.read(READ_CHUNK))
            elif isinstance(event, Request):
                self._dispatch(event)
                await self._wait_for_room()
            elif isinstance(event, InvalidRequest):
                self._refuse(event)
            elif isinstance(event, Disconnect):
                self._log(logging.INFO, "client disconnected", "disconnect")
                self._flush_on_close = True
                return
            elif isinstance(event, ConnectionClosed):
                level = logging.INFO if self._stopping else logging.WARNING
                self._log(level, "connection closed without DISCONNECT", "closed")
                return

    def _dispatch(self, request: Request) -> None:
        assert self._export is not None
        if request.opcode in (Cmd.READ, Cmd.WRITE):
            self._inflight_bytes += request.length
        self._idle.clear()
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, execute, self._export.volume, request
        )
        future.add_done_callback(functools.partial(self._complete, request, time.perf_counter()))

    def _complete(self, request: Request, started: float, future: asyncio.Future[Outcome]) -> None:
        assert self._export is not None
        try:
            outcome = future.result()
        except Exception:
            self._log(logging.ERROR, "request failed", "internal_error", exc_info=True)
            outcome = Outcome(Errno.IO)
        self._stats.record_request(
            self._export.name,
            self.client or "?",
            request.opcode,
            request.length,
            outcome.error,
            outcome.cache_hit,
            time.perf_counter() - started,
        )
        header = self._conn.send_reply(request.handle, outcome.error)
        if not self._writer.is_closing():
            self._writer.write(header + outcome.data if outcome.data else header)
        if request.opcode in (Cmd.READ, Cmd.WRITE):
            self._inflight_bytes -= request.length
        self._room.set()
        if not self._conn.inflight:
            self._idle.set()

    def _refuse(self, invalid: InvalidRequest) -> None:
        self._log(
            logging.INFO,
            "request refused",
            "bad_request",
            handle=invalid.handle,
            opcode=invalid.opcode,
            error=invalid.error.name,
            reason=invalid.reason,
        )
        assert self._export is not None
        self._stats.record_refusal(self._export.name, self.client or "?")
        self._writer.write(self._conn.send_reply(invalid.handle, invalid.error))

    async def _wait_for_room(self) -> None:
        while (
            self._conn.inflight >= self._limits.max_inflight
            or self._inflight_bytes + self._limits.max_payload > self._limits.max_inflight_bytes
        ):
            self._room.clear()
            await self._room.wait()
        if self._writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self._writer.drain()

    async def _close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self._writer.wait_closed()
