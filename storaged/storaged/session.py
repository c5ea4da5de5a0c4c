"""One client connection on its own thread: TLS, login, then requests in batches.

A thin blocking I/O shell: ``netblk.protocol.codec.ServerConnection`` takes
the HELLO, and after login the engine (``storaged._engine.run``) takes the
request frames straight from the codec's receive buffer, a batch at a time:
it checks, runs and counts them and hands back every reply of the batch as
one buffer, which leaves in one send (one run of TLS records).  A batch
ends after ``max_inflight`` requests or ``max_inflight_bytes`` of payload,
which bounds a connection's memory; a client that sends more waits in TCP.
Only FLUSH goes to the worker pool (``storaged._engine.flush``): an
fdatasync can take long, and the requests behind it need not wait (a FLUSH
covers the writes completed before it arrived, which the engine finished
before it handed the FLUSH over).

Why a thread and not an event loop: under the GIL, the per-request hand-offs
between a loop and worker threads cost more than the work of a 4 KiB request.
The engine releases the GIL for its I/O and crypto, and blocking socket
calls release it too, so connections run side by side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TYPE_CHECKING

from netblk.addresses import host_port
from netblk.protocol.codec import (
    NEED_DATA,
    ConnectionClosed,
    ExportGeometry,
    Hello,
    ProtocolError,
    ServerConnection,
)
from netblk.protocol.constants import Cmd, Errno, ExportFlag, LoginStatus
from netblk.tlsconf import describe_tls_error
from storaged._engine import (
    STOP_BROKEN,
    STOP_DISCONNECT,
    STOP_FLUSH,
    STOP_FULL,
    Counters,
    Scanner,
    flush,
    run,
)
from storaged.admission import Admission
from storaged.config import Access
from storaged.login import Gatekeeper
from storaged.stats import ServerStats
from storaged.transport import Channel, ServerTls
from storaged.volume import Volume

if TYPE_CHECKING:
    from storaged._engine import Note

log = logging.getLogger(__name__)

_OP_NAMES = {int(cmd): cmd.name for cmd in Cmd}


def scanner_for(geometry: ExportGeometry) -> Scanner:
    """The engine's request scanner for what a client was admitted to."""
    return Scanner(
        size=geometry.size, export_flags=int(geometry.flags), max_payload=geometry.max_payload
    )


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

    @property
    def payload_room(self) -> int:
        """READ and WRITE bytes a batch takes before one more request of
        ``max_payload`` could pass ``max_inflight_bytes``."""
        return max(0, self.max_inflight_bytes - self.max_payload)


@dataclass(frozen=True)
class _Serving:
    """What a logged-in connection's requests run against."""

    export: Export
    counters: Counters


class Fenced(Exception):
    """The store refused a batch because another instance took the export
    over: the connection ends without the batch's replies, and its client
    resends the requests to the new active."""


class Session:
    """Serves one accepted TCP connection until it ends or the server stops.

    ``run`` is the connection thread's body; ``stop`` and ``abort`` may be
    called from any thread.  Until ``run``, a session holds only its socket
    (storaged.server waits on the event loop for its first bytes).
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        *,
        accepted_at: float,
        tls: ServerTls,
        gatekeeper: Gatekeeper,
        admission: Admission[Session],
        exports: Mapping[str, Export],
        limits: SessionLimits,
        pool: Executor,
        stats: ServerStats,
    ) -> None:
        # The TCP socket, for shutdown() from other threads whatever carries
        # the bytes; _channel (after the handshake) carries them.
        self._sock = sock
        self._channel: Channel | None = None
        #: When the login deadline (``login_timeout``) started (monotonic).
        self.login_deadline = accepted_at + limits.login_timeout
        self._tls = tls
        self._gatekeeper = gatekeeper
        self._admission = admission
        self._exports = exports
        self._limits = limits
        self._pool = pool
        self._stats = stats
        self._conn = ServerConnection(self._make_scanner)
        self._scanner: Scanner | None = None
        host, port = str(peer[0]), int(peer[1])
        self.peer = host_port(host, port)
        self.peer_host = host
        self.client: str | None = None
        self._serving: _Serving | None = None
        self._stopping = False
        self.evicted = False
        self._flush_on_close = False
        # FLUSHes on the pool: (handle, error, note) come back through
        # _finished, and _wakeup (an eventfd) interrupts a wait for the socket.
        # Their handles stay in flight until this thread sends the replies.
        self._on_pool = 0
        self._finished: SimpleQueue[tuple[int, int, Note | None]] = SimpleQueue()
        self._wakeup = -1  # made at login: a connection not logged in holds one descriptor

    @property
    def export(self) -> str | None:
        """The export this connection logged in to, if it has."""
        return self._serving.export.name if self._serving is not None else None

    def _make_scanner(self, geometry: ExportGeometry) -> Scanner:
        """The codec's scanner, kept: the engine runs the frames it checks."""
        self._scanner = scanner_for(geometry)
        return self._scanner

    def _log(
        self, level: int, msg: str, event: str, *, exc_info: bool = False, **fields: object
    ) -> None:
        extra = {"event": event, "peer": self.peer, "client": self.client}
        if self._serving is not None:
            extra["export"] = self._serving.export.name
        log.log(level, msg, exc_info=exc_info, extra=extra | fields)

    # ------------------------------------------------------------------
    # Control from other threads
    # ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking requests (server shutdown); the ones taken finish."""
        self._stopping = True
        self._shutdown_socket(socket.SHUT_RD)

    def abort(self) -> None:
        """Break the connection now (shutdown took too long)."""
        self._stopping = True
        self._shutdown_socket(socket.SHUT_RDWR)

    def _shutdown_socket(self, how: int) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(how)

    def evict(self) -> None:
        """Break a connection that has not logged in, to make room."""
        self.evicted = True
        self._shutdown_socket(socket.SHUT_RDWR)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Close a session that never ran (evicted or timed out before its
        first bytes)."""
        self._admission.leave(self)
        self._sock.close()

    # ------------------------------------------------------------------
    # The connection thread
    # ------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self._login():
                self._serve()
        except ProtocolError as exc:
            self._stats.protocol_error()
            level = logging.INFO if self._stopping else logging.WARNING
            self._log(level, "protocol error, closing", "protocol_error", reason=exc.reason)
            if exc.reply and self._channel is not None:
                with contextlib.suppress(OSError):
                    self._channel.sendall(exc.reply)
        except Fenced:
            self._log(
                logging.WARNING, "fenced: closing without replies", "fenced", reason="blocklisted"
            )
        except OSError as exc:  # ssl.SSLError and ConnectionError are OSErrors
            self._log(logging.INFO, "connection lost", "connection_lost", reason=str(exc))
        except Exception:  # a bug must cost one connection, never the server
            self._log(logging.ERROR, "internal error, closing", "internal_error", exc_info=True)
        finally:
            self._finish()

    def _finish(self) -> None:
        """Let pool work end, flush after a DISCONNECT, close."""
        with contextlib.suppress(OSError, Fenced):
            self._answer_pool(block=True)
        if self._flush_on_close and self._serving is not None:
            try:
                self._serving.export.volume.flush()
            except OSError as exc:
                self._log(logging.ERROR, "flush on close failed", "io_error", error=str(exc))
        self._close()

    def _login(self) -> bool:
        deadline = self.login_deadline
        try:
            if (remaining := deadline - time.monotonic()) <= 0:
                raise TimeoutError("login timed out")
            self._sock.settimeout(remaining)
            self._channel = channel = self._tls.handshake(self._sock)
            hello = self._read_hello(channel, deadline)
        except (OSError, TimeoutError) as exc:
            if self._stopping:
                self._log(logging.INFO, "closed during shutdown", "login_abandoned")
                return False
            reason = describe_tls_error(exc)
            self._stats.login_failed("tls")
            self._log(
                logging.WARNING, "TLS handshake or login failed", "login_failed", reason=reason
            )
            return False
        if hello is None:
            return False
        identity = channel.identity
        # On the pool: argon2id is slow and memory-hungry by design, and the
        # pool bounds how many run at once.
        decision = self._pool.submit(
            self._gatekeeper.decide,
            self.peer_host,
            identity,
            hello.export,
            hello.token,
            time.monotonic(),
        ).result()
        self.client = identity
        if decision.status is not LoginStatus.OK:
            self._stats.login_failed(decision.status.name.lower())
            self._log(
                logging.WARNING,
                "login refused",
                "login_failed",
                status=decision.status.name,
                reason=decision.reason,
                requested_export=hello.export,
            )
            channel.sendall(self._conn.refuse(decision.status))
            return False
        export = self._exports.get(hello.export)
        if export is None:
            # Admitted, but this instance is the export's standby.
            self._stats.login_failed("unavailable")
            self._log(
                logging.INFO,
                "login refused: export is served by another instance",
                "login_unavailable",
                requested_export=hello.export,
            )
            channel.sendall(self._conn.refuse(LoginStatus.UNAVAILABLE))
            return False
        assert identity is not None  # the gatekeeper admits only configured clients
        full = self._admission.log_in(self, identity)
        if full is not None:
            self._stats.login_failed("connection_limit")
            self._log(
                logging.WARNING,
                "login refused: too many connections",
                "login_failed",
                status=LoginStatus.UNAVAILABLE.name,
                reason=full,
                requested_export=hello.export,
            )
            channel.sendall(self._conn.refuse(LoginStatus.UNAVAILABLE))
            return False
        flags = export.flags
        if decision.access is Access.RO:
            flags |= ExportFlag.READ_ONLY
        self._serving = _Serving(export, self._stats.counters(export.name, identity))
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC)
        channel.settimeout(None)
        channel.sendall(
            self._conn.accept(
                ExportGeometry(
                    size=export.volume.size,
                    flags=flags,
                    max_payload=self._limits.max_payload,
                    max_inflight=self._limits.max_inflight,
                )
            )
        )
        self._stats.login_ok()
        self._log(
            logging.INFO,
            "client logged in",
            "login_ok",
            access=decision.access.value,
            kernel_tls=channel.kernel_tls(),
        )
        return True

    def _read_hello(self, channel: Channel, deadline: float) -> Hello | None:
        while True:
            event = self._conn.next_event()
            if isinstance(event, Hello):
                return event
            if isinstance(event, ConnectionClosed):
                self._log(logging.INFO, "closed before login", "login_abandoned")
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("handshake timed out")
            channel.settimeout(remaining)
            self._conn.receive_data(channel.recv())

    def _serve(self) -> None:
        """Run batches of requests until the client or the server ends."""
        assert self._serving is not None and self._scanner is not None
        scanner = self._scanner
        volume = self._serving.export.volume.engine
        counters = self._serving.counters
        limits = self._limits
        while True:
            buffer, start = self._conn.frames()
            consumed, reply, _taken, _payload, stop, detail, notes = run(
                scanner,
                volume,
                counters,
                buffer,
                start,
                limits.max_inflight,
                limits.payload_room,
            )
            self._conn.consume(consumed)
            self._log_notes(notes)
            self._check_fenced(notes)
            self._send(reply)
            if stop == STOP_FULL:
                continue
            if stop == STOP_FLUSH:
                assert isinstance(detail, int)
                self._to_pool(detail)
            elif stop == STOP_DISCONNECT:
                self._log(logging.INFO, "client disconnected", "disconnect")
                self._flush_on_close = True
                return
            elif stop == STOP_BROKEN:
                raise ProtocolError(str(detail))
            # STOP_SHORT: the codec says whether the stream goes on
            elif self._conn.next_event() is NEED_DATA:
                self._receive()
            else:
                level = logging.INFO if self._stopping else logging.WARNING
                self._log(level, "connection closed without DISCONNECT", "closed")
                return

    def _log_notes(self, notes: list[Note]) -> None:
        """What the engine noted in a batch: refusals and store failures."""
        for event, handle, opcode, offset, length, error, reason in notes:
            op = _OP_NAMES.get(opcode, str(opcode))
            if event == "refused":
                self._log(
                    logging.INFO,
                    "request refused",
                    "bad_request",
                    handle=handle,
                    opcode=opcode,
                    error=Errno(error).name,
                    reason=reason,
                )
            else:
                self._log(
                    logging.ERROR,
                    "storage I/O failed",
                    "io_error",
                    volume=str(self._serving.export.volume.location) if self._serving else None,
                    op=op,
                    offset=offset,
                    length=length,
                    error=reason,
                )

    def _check_fenced(self, notes: list[Note]) -> None:
        """Raise Fenced if the batch's store failures were the store
        refusing us for good; the replies must not say EIO then."""
        if notes and self._serving is not None and self._serving.export.volume.engine.store.fenced:
            raise Fenced

    def _send(self, reply: bytes) -> None:
        if reply:
            assert self._channel is not None
            self._channel.sendall(reply)

    def _receive(self) -> None:
        """Feed the codec everything the peer has sent, waiting for at least
        one TLS record (or EOF); answers pool work that finishes meanwhile."""
        if self._stopping:
            # Shutdown takes no new requests.  stop()'s SHUT_RD alone is not
            # enough: Linux still hands out bytes that were already queued.
            self._conn.receive_data(b"")
            return
        channel = self._channel
        assert channel is not None
        while self._on_pool and not channel.buffered():
            readable, _, _ = select.select([channel.fileno(), self._wakeup], [], [])
            if self._wakeup in readable:
                os.eventfd_read(self._wakeup)
                self._answer_pool(block=False)
            if channel.fileno() in readable:
                break
        self._conn.receive_data(channel.recv())

    def _to_pool(self, handle: int) -> None:
        """Run the FLUSH ``handle`` on the pool; its reply comes back."""
        assert self._serving is not None and self._scanner is not None
        self._on_pool += 1

        def done(future: Future[tuple[int, Note | None]]) -> None:
            try:
                error, note = future.result()
            except Exception:
                self._log(logging.ERROR, "request failed", "internal_error", exc_info=True)
                error, note = Errno.IO, None
            self._finished.put((handle, error, note))
            os.eventfd_write(self._wakeup, 1)

        serving = self._serving
        self._pool.submit(
            flush, self._scanner, serving.export.volume.engine, serving.counters, handle
        ).add_done_callback(done)

    def _answer_pool(self, *, block: bool) -> None:
        """Send the replies of FLUSHes the pool finished (all if ``block``)."""
        replies: list[bytes] = []
        notes: list[Note] = []
        while self._on_pool and (block or not self._finished.empty()):
            handle, error, note = self._finished.get()
            self._on_pool -= 1
            replies.append(self._conn.send_reply(handle, Errno(error)))
            if note is not None:
                notes.append(note)
        self._log_notes(notes)
        self._check_fenced(notes)
        self._send(b"".join(replies))

    def _close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._wakeup >= 0:
            os.close(self._wakeup)
        self.close()
