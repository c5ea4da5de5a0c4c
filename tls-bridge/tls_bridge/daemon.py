"""The bridge loop: READY -> ACCEPT -> handshake on a thread -> DONE -> close.

``Bridge`` talks to the kernel only through an ``Upcall`` (netlink.GenlUpcall
in production, a fake in tests).  Handshakes run on worker threads because
pyOpenSSL blocks; at most ``max_concurrent`` run at once, and a socket is
ACCEPTed only when a worker is free, because its deadline starts at ACCEPT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from netblk.addresses import host_port
from tls_bridge.config import BridgeConfig, ServerEntry
from tls_bridge.genl import Done, EventsLost, HandshakeRequest, MalformedMessage, Ready
from tls_bridge.login import LoginResult, handshake_and_login

log = logging.getLogger("tls_bridge")

Handshake = Callable[[socket.socket, ServerEntry, str, float], LoginResult]


class Upcall(Protocol):
    """The kernel's handshake upcall, as the bridge sees it."""

    def events(self) -> AsyncIterator[Ready | EventsLost]: ...

    async def accept(self) -> HandshakeRequest | None:
        """Take one waiting socket (now an fd here), or None if none waits."""
        ...

    async def done(self, done: Done) -> None: ...


class Bridge:
    def __init__(
        self, config: BridgeConfig, upcall: Upcall, handshake: Handshake = handshake_and_login
    ) -> None:
        self._config = config
        self._upcall = upcall
        self._handshake = handshake
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then let running handshakes finish
        (each is bounded by its deadline) so every accepted fd gets its DONE."""
        listener = asyncio.create_task(self._listen())
        stopping = asyncio.create_task(stop.wait())
        finished, _ = await asyncio.wait({listener, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        failure = listener.exception() if listener in finished else None
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        if failure is not None:
            raise failure

    async def _listen(self) -> None:
        self._catch_up()  # sockets that were waiting before we subscribed
        async for event in self._upcall.events():
            if isinstance(event, EventsLost):
                log.warning("READY events were lost", extra={"event": "events_lost"})
                self._catch_up()
            else:
                log.debug("READY", extra={"event": "ready", "device": event.device})
                self._spawn(self._accept_one())

    def _catch_up(self) -> None:
        """ACCEPT until nothing waits, with every free worker."""

        async def drain() -> None:
            while await self._accept_one():
                pass

        for _ in range(self._config.max_concurrent):
            self._spawn(drain())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_one(self) -> bool:
        """Serve one waiting socket; False if none was waiting."""
        async with self._slots:
            try:
                request = await self._upcall.accept()
            except MalformedMessage as exc:
                await self._refuse_malformed(exc)
                return True
            except (OSError, TimeoutError) as exc:
                log.error("ACCEPT failed: %s", exc, extra={"event": "accept_failed"})
                return False
            if request is None:
                return False
            try:
                await self._serve(request)
            finally:
                os.close(request.sockfd)  # the kernel keeps its own reference
            return True

    async def _serve(self, request: HandshakeRequest) -> None:
        started = time.monotonic()
        result = await asyncio.to_thread(self._run_handshake, request)
        _log_result(request, result, time.monotonic() - started)
        done = Done(request.cookie, request.sockfd, result.status, result.reason, result.geometry)
        await self._send_done(done)

    def _run_handshake(self, request: HandshakeRequest) -> LoginResult:
        """On a worker thread: find the server's entry, run the handshake."""
        server = self._config.server_for(request.peer_addr, request.peer_port)
        if server is None:
            return LoginResult(
                errno.ENOKEY, f"tls-bridge has no [[servers]] entry for {_peer(request)}"
            )
        try:
            sock = socket.socket(fileno=request.sockfd)
        except OSError as exc:
            return LoginResult(exc.errno or errno.EBADF, f"fd from the kernel: {exc.strerror}")
        try:
            return self._handshake(sock, server, request.export, request.timeout_ms / 1000)
        except Exception:
            log.exception("handshake crashed", extra=_fields(request))
            return LoginResult(errno.EIO, "internal error in tls-bridge (see its log)")
        finally:
            sock.detach()  # the fd must stay open until DONE has named it

    async def _refuse_malformed(self, exc: MalformedMessage) -> None:
        log.error("malformed ACCEPT reply: %s", exc, extra={"event": "accept_malformed"})
        if exc.sockfd is None:
            return
        try:
            if exc.cookie is not None:
                await self._send_done(Done(exc.cookie, exc.sockfd, errno.EPROTO, str(exc)))
        finally:
            os.close(exc.sockfd)

    async def _send_done(self, done: Done) -> None:
        try:
            await self._upcall.done(done)
        except (OSError, TimeoutError) as exc:
            # The driver gave up on this attempt (deadline, disconnect) and
            # will retry on its own; nothing to undo here.
            log.warning(
                "DONE refused: %s", exc, extra={"event": "done_failed", "cookie": done.cookie}
            )


def _peer(request: HandshakeRequest) -> str:
    return host_port(request.peer_addr, request.peer_port)


def _fields(request: HandshakeRequest) -> dict[str, object]:
    return {
        "device": f"netblk{request.device}",
        "peer": _peer(request),
        "export": request.export,
        "cookie": request.cookie,
    }


def _log_result(request: HandshakeRequest, result: LoginResult, seconds: float) -> None:
    fields = _fields(request) | {"cipher": result.cipher, "ms": round(seconds * 1000)}
    if result.geometry is not None:
        fields |= {"size": result.geometry.size, "flags": int(result.geometry.flags)}
        log.info("logged in", extra={"event": "login_ok"} | fields)
        return
    fields |= {"errno": errno.errorcode.get(result.status, result.status), "reason": result.reason}
    log.warning("handshake failed: %s", result.reason, extra={"event": "login_failed"} | fields)
