"""storaged's lifecycle: unlock volumes, listen, serve, shut down cleanly.

The event loop accepts connections, answers the control socket and handles
signals.  An accepted connection waits on the loop (one descriptor, no
thread) until its first bytes arrive, within ``login.timeout``; then a
Session serves it on its own thread.  storaged.admission caps the
connections not logged in yet and those served.  Accepting never stops on
an error: out of descriptors or memory, it evicts the oldest connection not
logged in and backs off.
An export on an RBD image is served only while this instance holds the
image's lock (storaged.failover): one task per such export stands by or
serves.  Shutdown (SIGTERM or SIGINT): stop accepting, stop reading new
requests, let in-flight requests finish and their replies go out, fdatasync
every volume, release the RBD locks, then close.  The control socket
answers with a JSON stats snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from netblk.protocol.constants import BLOCK_SIZE, ExportFlag
from netblk.tomlconf import ConfigError
from storaged.admission import Admission, ConnectionLimits
from storaged.config import Config, ExportConfig, RbdImage
from storaged.failover import Ownership
from storaged.login import Gatekeeper
from storaged.luks2 import Luks2Error
from storaged.session import Export, Session, SessionLimits
from storaged.stats import ServerStats
from storaged.transport import ServerTls
from storaged.volume import Volume

log = logging.getLogger(__name__)

#: Connections the kernel may queue before we accept them.
LISTEN_BACKLOG = 128
#: How often shutdown checks whether the connection threads have ended.
SHUTDOWN_POLL = 0.05
#: How long a flush during shutdown may take per volume before we give up.
FLUSH_TIMEOUT = 60.0
#: accept() failures that mean the host is out of something (descriptors,
#: memory): wait before the next try, from the first pause doubling to the
#: longest.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_FIRST_PAUSE = 0.01
ACCEPT_LONGEST_PAUSE = 1.0
#: accept() failures that are the new connection's own (accept(2) says to
#: retry at once, as for EAGAIN).
ACCEPT_CONNECTION_ERRORS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EPERM,
    }
)


def read_passphrase(export: ExportConfig) -> bytes:
    """The export's passphrase from its file or environment variable."""
    if export.passphrase_file is not None:
        try:
            raw = export.passphrase_file.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"exports.{export.name}.passphrase_file: cannot read "
                f"{export.passphrase_file}: {exc.strerror}"
            ) from None
        return raw.removesuffix(b"\n")
    assert export.passphrase_env is not None
    value = os.environ.get(export.passphrase_env)
    if value is None:
        raise ConfigError(
            f"exports.{export.name}.passphrase_env: ${export.passphrase_env} is not set"
        )
    return value.encode()


def export_flags(config: ExportConfig) -> ExportFlag:
    # MULTI_CONN: every session of an export shares one Volume (one store),
    # so a FLUSH on any connection covers them all.
    flags = (
        ExportFlag.SEND_FLUSH
        | ExportFlag.SEND_FUA
        | ExportFlag.SEND_WRITE_ZEROES
        | ExportFlag.MULTI_CONN
    )
    if config.trim:
        flags |= ExportFlag.SEND_TRIM
    return flags


class StorageServer:
    """Owns the volumes, the worker pool, the listeners and the sessions."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = ServerStats()
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="storaged-io")
        self.gatekeeper = Gatekeeper(config.clients, config.exports, config.login)
        self.admission: Admission[Session] = Admission(
            ConnectionLimits(
                max_pending=config.login.max_pending,
                max_pending_per_peer=config.login.max_pending_per_peer,
                max_connections=config.max_connections,
                max_connections_per_client=config.max_connections_per_client,
            )
        )
        #: The exports this instance serves now; an RBD export is here only
        #: while this instance is its active.
        self.exports: dict[str, Export] = {}
        self.ownerships: dict[str, Ownership] = {}
        self._ownership_tasks: list[asyncio.Task[None]] = []
        self._servers: list[asyncio.Server] = []
        self._listeners: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._sessions: dict[Session, threading.Thread] = {}
        #: Connections waiting on the loop for their first bytes.
        self._waiting: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self.addresses: list[tuple[str, int]] = []

    async def open_volumes(self) -> None:
        """Unlock every export's volume (argon2id: seconds, in parallel)."""
        for notice in self.config.notices:
            log.warning(notice, extra={"event": "config_notice"})
        await asyncio.gather(*map(self._open_export, self.config.exports.values()))

    async def _open_export(self, config: ExportConfig) -> None:
        passphrase = read_passphrase(config)

        def open_volume() -> Volume:
            volume = Volume.open(config.volume, passphrase)
            if volume.size % BLOCK_SIZE or volume.size <= 0:
                raise Luks2Error(f"volume size {volume.size} is unusable")
            return volume

        def activate(volume: Volume) -> None:
            self.exports[config.name] = Export(config.name, volume, export_flags(config))
            log.info(
                "export ready",
                extra={
                    "event": "export_ready",
                    "export": config.name,
                    "volume": str(volume.location),
                    "size": volume.size,
                },
            )

        try:
            if isinstance(config.volume, RbdImage):
                ownership = Ownership(
                    config.name,
                    config.volume,
                    self.config.failover,
                    open_volume,
                    activate,
                    lambda: self._withdraw(config.name),
                )
                await ownership.prepare()
                self.ownerships[config.name] = ownership
            else:
                loop = asyncio.get_running_loop()
                activate(await loop.run_in_executor(self.pool, open_volume))
        except (OSError, Luks2Error) as exc:
            raise ConfigError(f"exports.{config.name}: {config.volume}: {exc}") from None

    def _withdraw(self, name: str) -> None:
        """Stop serving an export that another instance took over: its
        sessions end without answering what they had in flight."""
        self.exports.pop(name, None)
        for session in list(self._sessions):
            if session.export == name:
                session.abort()

    async def start(self) -> None:
        settings = self.config.tls
        tls = ServerTls(settings.cert, settings.key, settings.ca, kernel_tls=settings.kernel_tls)
        limits = SessionLimits(
            max_inflight=self.config.max_inflight,
            max_inflight_bytes=self.config.max_inflight_bytes,
            max_payload=self.config.max_payload,
            login_timeout=self.config.login.timeout,
        )
        loop = asyncio.get_running_loop()

        async def accept(listener: socket.socket) -> None:
            pause = ACCEPT_FIRST_PAUSE
            while True:
                try:
                    conn, peer = await loop.sock_accept(listener)
                except OSError as exc:
                    if exc.errno in ACCEPT_CONNECTION_ERRORS:
                        continue
                    log.warning(
                        "accept failed, retrying",
                        extra={"event": "accept_failed", "error": str(exc), "pause": pause},
                    )
                    self._evict(self.admission.evict_oldest(), f"accept() failed: {exc}")
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, ACCEPT_LONGEST_PAUSE)
                    continue
                pause = ACCEPT_FIRST_PAUSE
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                session = Session(
                    conn,
                    peer,
                    accepted_at=time.monotonic(),
                    tls=tls,
                    gatekeeper=self.gatekeeper,
                    admission=self.admission,
                    exports=self.exports,
                    limits=limits,
                    pool=self.pool,
                    stats=self.stats,
                )
                for victim in self.admission.arrive(session, session.peer_host):
                    self._evict(victim, "too many connections waiting to log in")
                waiting = asyncio.create_task(self._start_when_readable(session))
                self._waiting.add(waiting)
                waiting.add_done_callback(self._waiting.discard)

        for host in self.config.listen:
            for listener in await self._listen(host, self.config.port):
                self._listeners.append(listener)
                self.addresses.append(listener.getsockname()[:2])
                self._acceptors.append(asyncio.create_task(accept(listener)))
        if self.config.control_socket is not None:
            await self._start_control(self.config.control_socket)
        self._ownership_tasks = [
            asyncio.create_task(ownership.run()) for ownership in self.ownerships.values()
        ]
        log.info(
            "storaged listening",
            extra={"event": "listening", "addresses": [f"{h}:{p}" for h, p in self.addresses]},
        )

    async def _start_when_readable(self, session: Session) -> None:
        """Give ``session`` a thread once its client has sent something."""
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        descriptor = session.fileno()
        loop.add_reader(descriptor, wake)
        started = False
        try:
            await asyncio.wait_for(readable, session.login_deadline - time.monotonic())
            started = not session.evicted
        except TimeoutError:
            self.stats.login_failed("tls")
            log.warning(
                "TLS handshake or login failed",
                extra={
                    "event": "login_failed",
                    "peer": session.peer,
                    "client": None,
                    "reason": "the client sent nothing within login.timeout",
                },
            )
        finally:
            loop.remove_reader(descriptor)
            if not started:  # timed out, evicted, or storaged shuts down
                session.close()
        if not started:
            return
        thread = threading.Thread(
            target=self._serve_session,
            args=(session,),
            name=f"storaged-conn {session.peer}",
            daemon=True,
        )
        self._sessions[session] = thread
        thread.start()

    def _evict(self, session: Session | None, reason: str) -> None:
        """Close a connection that has not logged in, to make room."""
        if session is None:
            return
        self.stats.login_failed("evicted")
        log.info(
            "connection closed before login to make room",
            extra={"event": "login_evicted", "peer": session.peer, "reason": reason},
        )
        session.evict()

    def _serve_session(self, session: Session) -> None:
        self.stats.connection_opened()
        try:
            session.run()
        finally:
            self.stats.connection_closed()
            del self._sessions[session]

    @staticmethod
    async def _listen(host: str, port: int) -> list[socket.socket]:
        """Listening sockets for every address ``host`` resolves to."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        listeners: list[socket.socket] = []
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            listener = socket.socket(family, kind, proto)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # "::" must not also claim IPv4
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                listener.bind(address)
                listener.listen(LISTEN_BACKLOG)
                listener.setblocking(False)
            except OSError:
                listener.close()
                for opened in listeners:
                    opened.close()
                raise
            listeners.append(listener)
        return listeners

    async def _start_control(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)

        async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(json.dumps(self.snapshot(), indent=2).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

        old_umask = os.umask(0o177)  # the socket is born 0600: stats are for root
        try:
            self._servers.append(await asyncio.start_unix_server(answer, path))
        finally:
            os.umask(old_umask)

    def snapshot(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        snap["volumes"] = {}
        for name, config in self.config.exports.items():
            ownership = self.ownerships.get(name)
            export = self.exports.get(name)
            entry: dict[str, Any] = {"path": str(config.volume)}
            if export is not None:
                entry["size"] = export.volume.size
                entry["syncs"] = export.volume.engine.store.syncs
            if ownership is not None:
                entry["role"] = ownership.role
                entry["activations"] = ownership.activations
            snap["volumes"][name] = entry
        return snap

    def request_stop(self) -> None:
        self._stopped.set()

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        await self._stopped.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("shutting down", extra={"event": "shutdown", "sessions": len(self._sessions)})
        for task in [*self._acceptors, *self._ownership_tasks, *self._waiting]:
            task.cancel()
        for listener in self._listeners:
            listener.close()
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            session.stop()
        if not await self._sessions_ended(self.config.shutdown_timeout):
            for session in list(self._sessions):
                session.abort()
            await self._sessions_ended(FLUSH_TIMEOUT)
        loop = asyncio.get_running_loop()
        for export in self.exports.values():
            await asyncio.wait_for(
                loop.run_in_executor(self.pool, export.volume.close), FLUSH_TIMEOUT
            )
        for ownership in self.ownerships.values():
            await asyncio.wait_for(ownership.release(), FLUSH_TIMEOUT)
        self.pool.shutdown(wait=True)
        if self.config.control_socket is not None:
            self.config.control_socket.unlink(missing_ok=True)
        log.info("stopped", extra={"event": "stopped"})

    async def _sessions_ended(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every connection thread to end."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL)
        return not self._sessions
