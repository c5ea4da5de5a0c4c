"""One client connection on its own thread: TLS, login, then requests in batches.

A thin blocking I/O shell around ``protocol.codec.ServerConnection``.  Each
receive takes every request the socket holds; READs, WRITEs, TRIMs and
WRITE_ZEROES run right here, in arrival order, and their replies leave
together in one send (one run of TLS records).  Runs of READs and WRITEs
without flags go through C in one call (``storaged._requests``, which does
what the codec and ``Volume.read``/``write`` would); every other frame
through the codec.  Only FLUSH is
handed to the worker pool: an fdatasync can take long, and the requests
behind it need not wait (a FLUSH covers the writes completed before it
arrived, which inline execution has already finished).  A batch ends after
``max_inflight`` requests or ``max_inflight_bytes`` of payload, which bounds a
connection's memory; a client that sends more waits in TCP.

Why a thread and not the event loop: under the GIL, the per-request hand-offs
between a loop and worker threads cost more than the work of a 4 KiB request.
Blocking socket calls, TLS record crypto, pread/pwrite and AES release the
GIL, so connections still run side by side.
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
from dataclasses import dataclass, field
from queue import SimpleQueue

from netblk.protocol.codec import (
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
from netblk.protocol.constants import Cmd, Errno, ExportFlag, LoginStatus
from netblk.tlsconf import describe_tls_error
from storaged._requests import Runner
from storaged.config import Access
from storaged.engine import Outcome, execute
from storaged.login import Gatekeeper
from storaged.stats import RequestRecord, ServerStats
from storaged.transport import Channel, ServerTls
from storaged.volume import Volume

log = logging.getLogger(__name__)

#: Requests whose payload counts against ``max_inflight_bytes``.
_PAYLOAD_OPS = frozenset((Cmd.READ, Cmd.WRITE))


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


@dataclass
class _Batch:
    """Requests taken in since the last send, and their replies."""

    replies: list[bytes] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)
    taken: int = 0
    payload: int = 0

    def full(self, limits: SessionLimits) -> bool:
        """Whether one more request could break the per-connection bounds."""
        return (
            self.taken >= limits.max_inflight
            or self.payload + limits.max_payload > limits.max_inflight_bytes
        )


@dataclass(frozen=True)
class _Finished:
    """A request the worker pool ran (a FLUSH), back for its reply."""

    request: Request
    outcome: Outcome
    seconds: float


class Session:
    """Serves one accepted TCP connection until it ends or the server stops.

    ``run`` is the connection thread's body; ``stop`` and ``abort`` may be
    called from any thread.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        *,
        tls: ServerTls,
        gatekeeper: Gatekeeper,
        exports: Mapping[str, Export],
        limits: SessionLimits,
        pool: Executor,
        stats: ServerStats,
    ) -> None:
        # The TCP socket, for shutdown() from other threads whatever carries
        # the bytes; _channel (after the handshake) carries them.
        self._sock = sock
        self._channel: Channel | None = None
        self._tls = tls
        self._gatekeeper = gatekeeper
        self._exports = exports
        self._limits = limits
        self._pool = pool
        self._stats = stats
        self._conn = ServerConnection()
        host, port = str(peer[0]), int(peer[1])
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._peer_host = host
        self.client: str | None = None
        self._export: Export | None = None
        self._runner: Runner | None = None
        self._stopping = False
        self._flush_on_close = False
        # Requests on the pool: their outcomes come back through _finished,
        # and _wakeup (an eventfd) interrupts a wait for the socket.
        self._on_pool = 0
        self._finished: SimpleQueue[_Finished] = SimpleQueue()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC)

    def _log(self, level: int, msg: str, event: str, **fields: object) -> None:
        extra = {"event": event, "peer": self.peer, "client": self.client}
        if self._export is not None:
            extra["export"] = self._export.name
        log.log(level, msg, extra=extra | fields)

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
        except OSError as exc:  # ssl.SSLError and ConnectionError are OSErrors
            self._log(logging.INFO, "connection lost", "connection_lost", reason=str(exc))
        except Exception:  # a bug must cost one connection, never the server
            self._log(logging.ERROR, "internal error, closing", "internal_error", exc_info=True)
        finally:
            self._finish()

    def _finish(self) -> None:
        """Let pool work end, flush after a DISCONNECT, close."""
        finished = self._drain_pool(block=True)
        with contextlib.suppress(OSError):
            self._answer(finished)
        if self._flush_on_close and self._export is not None:
            try:
                self._export.volume.flush()
            except OSError as exc:
                self._log(logging.ERROR, "flush on close failed", "io_error", error=str(exc))
        self._close()

    def _login(self) -> bool:
        deadline = time.monotonic() + self._limits.login_timeout
        try:
            self._sock.settimeout(self._limits.login_timeout)
            self._channel = channel = self._tls.handshake(self._sock)
            hello = self._read_hello(channel, deadline)
        except (OSError, TimeoutError) as exc:
            if self._stopping:
                self._log(logging.INFO, "closed during shutdown", "login_abandoned")
                return False
            reason = describe_tls_error(exc)
            self._stats.login_failed("tls")
            self._gatekeeper.throttle.record_failure(f"peer:{self._peer_host}", time.monotonic())
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
            self._peer_host,
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
        export = self._exports[hello.export]
        flags = export.flags
        if decision.access is Access.RO:
            flags |= ExportFlag.READ_ONLY
        self._export = export
        self._runner = export.volume.runner(
            max_payload=self._limits.max_payload,
            writable=not flags & ExportFlag.READ_ONLY,
        )
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
        batch = _Batch()
        while True:
            if batch.full(self._limits):
                self._answer(batch)
                batch = _Batch()
            # The runner stops when the batch is full or at a frame it
            # leaves to the codec (asking it again would only repeat that).
            self._run_inline(batch)
            if batch.full(self._limits):
                continue
            try:
                event = self._conn.next_event()
            except ProtocolError:
                self._answer(batch)  # what came before the bad frame
                raise
            if isinstance(event, Request):
                self._take(event, batch)
                continue
            if isinstance(event, InvalidRequest):
                batch.replies.append(self._refuse(event))
                batch.taken += 1
                continue
            self._answer(batch)
            batch = _Batch()
            if event is NEED_DATA:
                self._receive()
            elif isinstance(event, Disconnect):
                self._log(logging.INFO, "client disconnected", "disconnect")
                self._flush_on_close = True
                return
            elif isinstance(event, ConnectionClosed):
                level = logging.INFO if self._stopping else logging.WARNING
                self._log(level, "connection closed without DISCONNECT", "closed")
                return

    def _run_inline(self, batch: _Batch) -> None:
        """Run the plain READs and WRITEs at the front of the buffer in C
        (storaged._requests), as far as the batch has room."""
        assert self._runner is not None
        limits = self._limits
        taken, payload = self._conn.run_requests(
            self._runner,
            limits.max_inflight - batch.taken,
            limits.max_inflight_bytes - limits.max_payload - batch.payload,
            batch.replies,
            batch.records,
        )
        batch.taken += taken
        batch.payload += payload

    def _take(self, request: Request, batch: _Batch) -> None:
        """Run ``request`` now (a FLUSH: on the pool) and queue its reply."""
        assert self._export is not None
        batch.taken += 1
        if request.opcode in _PAYLOAD_OPS:
            batch.payload += request.length
        if request.opcode is Cmd.FLUSH:
            self._to_pool(self._export.volume, request)
            return
        started = time.perf_counter()
        outcome = execute(self._export.volume, request)
        self._complete(batch, request, outcome, time.perf_counter() - started)

    def _complete(self, batch: _Batch, request: Request, outcome: Outcome, seconds: float) -> None:
        """Queue the reply to a request that ran, and count it."""
        batch.records.append(
            (request.opcode, request.length, outcome.error, outcome.cache_hit, seconds)
        )
        batch.replies.append(self._conn.send_reply(request.handle, outcome.error))
        if outcome.data:
            batch.replies.append(outcome.data)

    def _answer(self, batch: _Batch) -> None:
        if batch.records:
            assert self._export is not None
            self._stats.record_requests(self._export.name, self.client or "?", batch.records)
        self._send(batch.replies)

    def _send(self, replies: list[bytes]) -> None:
        if replies:
            assert self._channel is not None
            self._channel.sendall(b"".join(replies) if len(replies) > 1 else replies[0])

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
                self._answer(self._drain_pool(block=False))
            if channel.fileno() in readable:
                break
        self._conn.receive_data(channel.recv())

    def _to_pool(self, volume: Volume, request: Request) -> None:
        started = time.perf_counter()
        self._on_pool += 1

        def done(future: Future[Outcome]) -> None:
            try:
                outcome = future.result()
            except Exception:
                self._log(logging.ERROR, "request failed", "internal_error", exc_info=True)
                outcome = Outcome(Errno.IO)
            self._finished.put(_Finished(request, outcome, time.perf_counter() - started))
            os.eventfd_write(self._wakeup, 1)

        self._pool.submit(execute, volume, request).add_done_callback(done)

    def _drain_pool(self, *, block: bool) -> _Batch:
        """The pool's finished requests (all of them if ``block``), answered."""
        batch = _Batch()
        while self._on_pool and (block or not self._finished.empty()):
            item = self._finished.get()
            self._on_pool -= 1
            self._complete(batch, item.request, item.outcome, item.seconds)
        return batch

    def _refuse(self, invalid: InvalidRequest) -> bytes:
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
        return self._conn.send_reply(invalid.handle, invalid.error)

    def _close(self) -> None:
        self._runner = None  # closes its descriptor of the volume file
        if self._channel is not None:
            self._channel.close()
        self._sock.close()
        os.close(self._wakeup)
