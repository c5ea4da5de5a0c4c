"""What no client can take from the others: descriptors, threads, memory,
connections (storaged.admission, the accept loop, the reply batches).

The admission rules run without sockets first; then a storaged process,
with the descriptor limit of a default systemd service (1024), is flooded
with idle connections that never log in and with clients that ask for
1 MiB READs and never read the replies.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netblk.protocol.codec import ClientConnection, HelloReply, encode_hello, encode_request
from netblk.protocol.constants import HELLO_REPLY, MAX_PAYLOAD, Cmd, LoginStatus
from storaged.admission import Admission, ConnectionLimits
from storaged.config import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_MAX_PENDING_PER_PEER
from tests.storaged.stack import ServerProcess, Stack, raw_tls_socket

#: A default systemd service's RLIMIT_NOFILE.
SERVICE_MAX_FILES = 1024
#: Idle connections of the flood: nearly every descriptor storaged may have.
FLOOD = 1000
#: How long a real client may take to log in and read while or after a
#: flood (a bound against hangs, far above the milliseconds it takes).
LOGIN_WITHIN = 20.0
#: docs/operations.md's memory bound: storaged's own RSS, and what each
#: served connection may add beyond its ``max_inflight_bytes`` of replies.
BASE_RSS = 100 << 20
PER_CONNECTION_EXTRA = MAX_PAYLOAD + (1 << 20)

LIMITS = ConnectionLimits(
    max_pending=4, max_pending_per_peer=2, max_connections=3, max_connections_per_client=2
)


# --- the rules -----------------------------------------------------------------


def test_a_full_peer_gives_way_oldest_first_and_other_peers_keep_theirs() -> None:
    admission: Admission[str] = Admission(LIMITS)
    assert admission.arrive("a1", "A") == []
    assert admission.arrive("b1", "B") == []
    assert admission.arrive("a2", "A") == []
    assert admission.arrive("a3", "A") == ["a1"]  # A's oldest, not B's
    assert admission.arrive("a4", "A") == ["a2"]
    assert admission.pending == 3
    assert admission.log_in("a1", "alice") is not None  # evicted: no login
    assert admission.log_in("b1", "bob") is None


def test_a_full_server_gives_way_oldest_first() -> None:
    admission: Admission[str] = Admission(LIMITS)
    for index, peer in enumerate("ABCD"):
        assert admission.arrive(f"c{index}", peer) == []
    assert admission.arrive("c4", "E") == ["c0"]
    assert admission.evict_oldest() == "c1"
    admission.leave("c2")
    assert admission.pending == 2
    assert admission.arrive("c5", "F") == []
    assert admission.evict_oldest() == "c3"


def test_logins_beyond_a_cap_are_refused_until_a_connection_leaves() -> None:
    admission: Admission[str] = Admission(LIMITS)

    def arrive_and_log_in(conn: str, client: str) -> str | None:
        assert admission.arrive(conn, "A") == []
        return admission.log_in(conn, client)

    assert arrive_and_log_in("x1", "alice") is None
    assert arrive_and_log_in("x2", "alice") is None
    refusal = arrive_and_log_in("x3", "alice")
    assert refusal is not None and "max_connections_per_client (2)" in refusal
    assert arrive_and_log_in("y1", "bob") is None
    refusal = arrive_and_log_in("y2", "bob")
    assert refusal is not None and "max_connections (3)" in refusal
    assert admission.pending == 0  # refused logins wait no more
    admission.leave("x1")
    admission.leave("x1")  # idempotent
    assert admission.served == 2
    assert admission.arrive("y3", "F") == []
    assert admission.log_in("y3", "bob") is None


# --- a storaged process ----------------------------------------------------------


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.fixture(autouse=True)
def room_for_the_flood() -> None:
    """This process holds the flood's client ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * FLOOD + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * FLOOD), hard))


@contextlib.contextmanager
def storaged(stack: Stack) -> Iterator[ServerProcess]:
    server = ServerProcess(stack, max_files=SERVICE_MAX_FILES)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def flood(stack: Stack, count: int = FLOOD, source: str = "127.0.0.1") -> Iterator[None]:
    """``count`` TCP connections that never send a byte."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(
                socket.create_connection(("127.0.0.1", stack.port), LOGIN_WITHIN, (source, 0))
            )
        yield
    finally:
        for sock in socks:
            sock.close()


def log_in(stack: Stack, client: str = "alice", source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A raw TLS connection, logged in to "data"; raises if refused."""
    sock, reply = hello(stack, client, source)
    assert reply.status is LoginStatus.OK, reply
    return sock


def hello(stack: Stack, client: str, source: str) -> tuple[ssl.SSLSocket, HelloReply]:
    sock = raw_tls_socket(stack, client, timeout=LOGIN_WITHIN, source=source)
    sock.sendall(encode_hello("data", stack.tokens[client].encode()))
    conn = ClientConnection()
    while not isinstance(event := conn.next_event(), HelloReply):
        data = sock.recv(HELLO_REPLY.size)
        assert data, "the server closed without a HELLO reply"
        conn.receive_data(data)
    return sock, event


def logs_in_and_reads(stack: Stack, source: str = "127.0.0.1") -> None:
    """A real client still gets in and is served, within LOGIN_WITHIN."""
    with log_in(stack, source=source) as sock:
        sock.sendall(encode_request(Cmd.READ, 1, 0, 4096))
        conn = ClientConnection()
        received = 0
        while received < 16 + 4096:
            data = sock.recv(65536)
            assert data, "the server closed instead of answering a READ"
            received += len(data)
            conn.receive_data(data)


def events(server: ServerProcess, event: str) -> list[dict[str, object]]:
    records = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    return [r for r in records if r.get("event") == event]


def test_a_flood_from_one_address_costs_that_address_its_oldest_connections(
    stack: Stack,
) -> None:
    with storaged(stack) as server:
        assert server.proc is not None
        pid = server.proc.pid
        before = open_files(pid), threads(pid)
        with flood(stack):
            deadline = time.monotonic() + LOGIN_WITHIN
            while len(events(server, "login_evicted")) < FLOOD - DEFAULT_MAX_PENDING_PER_PEER:
                assert time.monotonic() < deadline, "storaged did not take in the flood"
                time.sleep(0.1)
            # The flood holds no thread and only its address's share of descriptors...
            assert open_files(pid) <= before[0] + DEFAULT_MAX_PENDING_PER_PEER
            assert threads(pid) == before[1]
            # ...and a client from that very address still logs in.
            logs_in_and_reads(stack, "127.0.0.1")
            logs_in_and_reads(stack, "127.0.0.2")
        assert server.proc.poll() is None


def test_running_out_of_descriptors_never_stops_accepting(stack: Stack) -> None:
    # Caps above the descriptor limit, so that accept() itself fails.
    stack.extra_config = "[login]\nmax_pending = 5000\nmax_pending_per_peer = 5000\n"
    stack.config_path.write_text(stack.render_config())
    with storaged(stack) as server:
        assert server.proc is not None
        pid = server.proc.pid
        base_threads = threads(pid)
        with flood(stack, SERVICE_MAX_FILES):
            deadline = time.monotonic() + LOGIN_WITHIN
            while not events(server, "accept_failed"):
                assert time.monotonic() < deadline, "the flood never ran storaged out of files"
                time.sleep(0.1)
            assert "Too many open files" in str(events(server, "accept_failed")[0]["error"])
            assert threads(pid) == base_threads  # idle connections wait on the event loop
            logs_in_and_reads(stack)
        logs_in_and_reads(stack)
        assert server.proc.poll() is None


def test_logins_beyond_the_connection_caps_are_refused_with_a_reason(stack: Stack) -> None:
    stack.config_path.write_text(
        stack.render_config().replace(
            "[server]\n", "[server]\nmax_connections = 3\nmax_connections_per_client = 2\n", 1
        )
    )
    with storaged(stack) as server:
        first, second = log_in(stack), log_in(stack)
        with second:
            sock, reply = hello(stack, "alice", "127.0.0.1")
            sock.close()
            assert reply.status is LoginStatus.UNAVAILABLE
            with log_in(stack, "bob"):
                sock, reply = hello(stack, "bob", "127.0.0.1")
                sock.close()
                assert reply.status is LoginStatus.UNAVAILABLE
            first.close()
            logs_in_and_reads(stack)
        refusals = [r for r in events(server, "login_failed") if r.get("status") == "UNAVAILABLE"]
        assert [r["reason"] for r in refusals] == [
            "client 'alice' holds server.max_connections_per_client (2)",
            "the server holds server.max_connections (3)",
        ]


def test_clients_that_never_read_their_replies_stay_within_the_memory_bound(
    stack: Stack,
) -> None:
    readers = 8
    with storaged(stack) as server:
        assert server.proc is not None
        pid = server.proc.pid
        batch = b"".join(encode_request(Cmd.READ, h, 0, MAX_PAYLOAD) for h in range(64))
        socks = [log_in(stack, "bob") for _ in range(readers)]
        try:
            for sock in socks:
                sock.setblocking(False)
            peak = 0
            for _ in range(20):  # each round offers every reader another 64 MiB of READs
                for sock in socks:
                    with contextlib.suppress(ssl.SSLWantWriteError, BlockingIOError):
                        sock.send(batch)
                time.sleep(0.2)
                peak = max(peak, rss(pid))
        finally:
            for sock in socks:
                sock.close()
    bound = BASE_RSS + readers * (DEFAULT_MAX_INFLIGHT_BYTES + PER_CONNECTION_EXTRA)
    # Each reader holds a whole batch of replies, which the bound counts.
    assert readers * DEFAULT_MAX_INFLIGHT_BYTES < peak <= bound, (peak >> 20, bound >> 20)
