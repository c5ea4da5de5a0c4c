"""How many connections storaged holds, and which one gives way.

Before login a connection has proven nothing, so what it may cost is
capped twice: ``max_pending`` in all and ``max_pending_per_peer`` from one
address.  A connection that arrives when a cap is full evicts the oldest
one under that cap instead of being refused: a real client finishes its
handshake in milliseconds, while a connection that has waited longest is
the likeliest to be one that never will, so a flood of idle connections
costs real clients nothing but a reconnect at worst.

After login, ``max_connections`` and ``max_connections_per_client`` bound
the memory of the connections that are served (each holds up to
``server.max_inflight_bytes`` of replies); a login beyond either is
refused (UNAVAILABLE) rather than evicting a client that is working.

Thread-safe: connections arrive on the event loop and log in or end on
their own threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Conn = TypeVar("Conn", bound=Hashable)


@dataclass(frozen=True)
class ConnectionLimits:
    max_pending: int
    max_pending_per_peer: int
    max_connections: int
    max_connections_per_client: int


class Admission(Generic[Conn]):
    """The connections waiting to log in (oldest first) and those served."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()  # protects everything below
        self._pending: OrderedDict[Conn, str] = OrderedDict()  # connection -> peer
        self._pending_by_peer: dict[str, OrderedDict[Conn, None]] = {}
        self._served: dict[Conn, str] = {}  # connection -> client
        self._served_by_client: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def served(self) -> int:
        return len(self._served)

    def arrive(self, conn: Conn, peer: str) -> list[Conn]:
        """Count ``conn`` (from address ``peer``) as waiting to log in; the
        connections it evicts, which the caller closes, come back."""
        limits = self.limits
        evicted: list[Conn] = []
        with self._lock:
            from_peer = self._pending_by_peer.setdefault(peer, OrderedDict())
            if len(from_peer) >= limits.max_pending_per_peer:
                evicted.append(next(iter(from_peer)))
                self._drop_pending(evicted[-1])
            if len(self._pending) >= limits.max_pending:
                evicted.append(next(iter(self._pending)))
                self._drop_pending(evicted[-1])
            self._pending[conn] = peer
            self._pending_by_peer.setdefault(peer, OrderedDict())[conn] = None
        return evicted

    def evict_oldest(self) -> Conn | None:
        """The connection that has waited longest to log in, no longer
        counted (the caller closes it), if there is one."""
        with self._lock:
            if not self._pending:
                return None
            conn = next(iter(self._pending))
            self._drop_pending(conn)
        return conn

    def log_in(self, conn: Conn, client: str) -> str | None:
        """Move ``conn`` from waiting to served by ``client``; if it was
        evicted meanwhile or a cap is full, it stays out and why comes back."""
        limits = self.limits
        with self._lock:
            if conn not in self._pending:
                return "evicted to make room for newer connections"
            self._drop_pending(conn)
            if len(self._served) >= limits.max_connections:
                return f"the server holds server.max_connections ({limits.max_connections})"
            if self._served_by_client.get(client, 0) >= limits.max_connections_per_client:
                return (
                    f"client {client!r} holds server.max_connections_per_client "
                    f"({limits.max_connections_per_client})"
                )
            self._served[conn] = client
            self._served_by_client[client] = self._served_by_client.get(client, 0) + 1
        return None

    def leave(self, conn: Conn) -> None:
        """``conn`` ended, wherever it was; idempotent."""
        with self._lock:
            self._drop_pending(conn)
            client = self._served.pop(conn, None)
            if client is not None:
                left = self._served_by_client[client] - 1
                if left:
                    self._served_by_client[client] = left
                else:
                    del self._served_by_client[client]

    def _drop_pending(self, conn: Conn) -> None:
        peer = self._pending.pop(conn, None)
        if peer is None:
            return
        from_peer = self._pending_by_peer[peer]
        del from_peer[conn]
        if not from_peer:
            del self._pending_by_peer[peer]
