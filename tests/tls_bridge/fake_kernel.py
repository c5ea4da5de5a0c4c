"""netblk.ko's side of the handshake upcall, played in Python.

``FakeKernel`` connects real TCP sockets to a storaged, multicasts READY,
"installs" each socket as an fd in this process on ACCEPT (a dup, as
fd_install would give us) and records DONE, checking that DONE names a
live fd of the right socket.  It keeps its own reference to every socket,
as the driver does, so tests can go on using a socket after tls-bridge is
done with it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tests.tls_bridge.support import LOOPBACK
from tls_bridge.config import BridgeConfig, ServerEntry
from tls_bridge.daemon import Bridge, Handshake
from tls_bridge.genl import Done, EventsLost, HandshakeRequest, MalformedMessage, Ready


@dataclass
class Posted:
    """One socket the fake driver connected and wants handshaken."""

    cookie: int
    sock: socket.socket
    export: str
    peer: str
    malformed: bool = False
    fd: int | None = None  # the fd installed in "tls-bridge" at ACCEPT


@dataclass
class FakeKernel:
    port: int
    timeout_ms: int = 10_000
    events_queue: asyncio.Queue[Ready | EventsLost | None] = field(default_factory=asyncio.Queue)
    pending: deque[Posted] = field(default_factory=deque)
    posted: dict[int, Posted] = field(default_factory=dict)
    dones: dict[int, Done] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    refuse_done: set[int] = field(default_factory=set)
    accepts: int = 0

    def post(
        self, export: str = "data", *, peer: str = LOOPBACK, ready: bool = True, malformed=False
    ) -> int:
        cookie = len(self.posted) + 1000
        sock = socket.create_connection((LOOPBACK, self.port), timeout=10)
        item = Posted(cookie, sock, export, peer, malformed)
        self.posted[cookie] = item
        self.pending.append(item)
        if ready:
            self.events_queue.put_nowait(Ready(device=cookie % 16))
        return cookie

    async def events(self) -> AsyncIterator[Ready | EventsLost]:
        while (event := await self.events_queue.get()) is not None:
            yield event

    async def accept(self) -> HandshakeRequest | None:
        self.accepts += 1
        if not self.pending:
            return None
        item = self.pending.popleft()
        item.fd = os.dup(item.sock.fileno())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if item.malformed:
            raise MalformedMessage("ACCEPT reply lacks EXPORT", item.cookie, item.fd)
        return HandshakeRequest(
            device=item.cookie % 16,
            sockfd=item.fd,
            cookie=item.cookie,
            peer_addr=item.peer,
            peer_port=self.port,
            export=item.export,
            timeout_ms=self.timeout_ms,
        )

    async def done(self, done: Done) -> None:
        item = self.posted[done.cookie]
        assert done.sockfd == item.fd
        # DONE must name an fd that is still our socket.
        assert os.fstat(done.sockfd).st_ino == os.fstat(item.sock.fileno()).st_ino
        self.in_flight -= 1
        self.dones[done.cookie] = done
        if done.cookie in self.refuse_done:
            raise OSError(errno.ESTALE, "stale cookie")

    def fd_closed(self, cookie: int) -> bool:
        item = self.posted[cookie]
        assert item.fd is not None
        try:
            return os.fstat(item.fd).st_ino != os.fstat(item.sock.fileno()).st_ino
        except OSError:
            return True

    def close(self) -> None:
        for item in self.posted.values():
            item.sock.close()


def config_for(entry: ServerEntry, max_concurrent: int = 4) -> BridgeConfig:
    return BridgeConfig({(entry.address, entry.port): entry}, max_concurrent=max_concurrent)


async def bridge_until(
    kernel: FakeKernel,
    config: BridgeConfig,
    dones: int,
    handshake: Handshake,
    *,
    before: list[Ready | EventsLost] | None = None,
) -> None:
    """Run a bridge until ``dones`` DONEs arrived, then stop it cleanly."""
    stop = asyncio.Event()
    run = asyncio.create_task(Bridge(config, kernel, handshake).run(stop))
    for event in before or []:
        kernel.events_queue.put_nowait(event)
    deadline = time.monotonic() + 60
    while len(kernel.dones) < dones:
        assert time.monotonic() < deadline, kernel.dones
        assert not run.done(), run
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(run, 30)
