"""netblk.ko with a set of connections per device (connections=2).

One connection per hardware queue: the set is handshaken as a unit (one
READY per connection, CONNECTED after the last DONE), small requests stay
on their CPU's connection while large ones from one submitting thread
spread over the set, losing one connection reconnects the whole set, and a
server without NETBLK_EXPORT_MULTI_CONN gets one connection.  The fake
server and fake tls-bridge are test_kmod_basic's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.vm.module import loaded, rmmod
from tests.vm.test_kmod_basic import (
    EXPORT_ALL,
    EXPORT_SIZE,
    OP_WRITE,
    Accepted,
    FakeServer,
    Genl,
    configure,
    dio_read,
    dio_write,
    disconnect,
    fake_stack,
    install_ktls,
    netblk_module,
    read,
    stats,
    wait_for,
    write,
)

CONNECTIONS = 2
EXPORT_MULTI_CONN = 1 << 5
DEV = "netblk0"


@pytest.fixture(scope="module")
def netblk() -> Iterator[None]:
    assert (os.cpu_count() or 1) >= CONNECTIONS, "a set of two needs a guest with two CPUs"
    if loaded():
        rmmod()
    with netblk_module(connections=CONNECTIONS):
        yield


@pytest.fixture
def dev0(netblk: None) -> Iterator[str]:
    assert read(DEV, "state") in {"disconnected", "error"}
    yield DEV
    disconnect(DEV)


@contextlib.contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    """Run the block inside on one CPU, so blk-mq picks that CPU's queue."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def writes_by_port(server: FakeServer) -> dict[int, int]:
    """WRITEs per connection (udev's probes read from any CPU)."""
    with server.lock:
        return {port: n for (port, op), n in server.requests_by_port.items() if op == OP_WRITE}


def kmsg_since(mark: int) -> str:
    out = subprocess.run(["dmesg"], check=True, capture_output=True, text=True).stdout
    return out[mark:]


def kmsg_mark() -> int:
    return len(subprocess.run(["dmesg"], check=True, capture_output=True, text=True).stdout)


def test_each_cpu_sends_small_requests_on_its_own_connection(dev0: str) -> None:
    with fake_stack(DEV, EXPORT_ALL | EXPORT_MULTI_CONN) as (server, bridge):
        assert read(DEV, "connections") == str(CONNECTIONS)
        assert server.connections == CONNECTIONS
        assert bridge.handshakes == CONNECTIONS
        assert int(read(DEV, "size")) * 512 == EXPORT_SIZE
        # udev's probe of the new disk may come from any CPU.
        subprocess.run(["udevadm", "settle", "-t", "30"], check=True, timeout=60)

        for cpu in range(CONNECTIONS):
            with server.lock:
                server.requests_by_port.clear()
            with on_cpu(cpu):
                for block in range(8):
                    dio_write((cpu << 20) + (block << 16), bytes([cpu + 1]) * (1 << 16))
            assert len(writes_by_port(server)) == 1, (cpu, writes_by_port(server))

        # What one connection wrote, the other reads back.
        for cpu in range(CONNECTIONS):
            with on_cpu((cpu + 1) % CONNECTIONS):
                assert dio_read(cpu << 20, 8 << 16) == bytes([cpu + 1]) * (8 << 16)

        disconnect(DEV)
        assert read(DEV, "connections") == "0"
        wait_for(lambda: server.disconnects == CONNECTIONS, 10, "DISCONNECT on each")


def writes_from_one_cpu(server: FakeServer, *fio_args: str) -> list[int]:
    """Run fio pinned to CPU 0 (one hardware queue) with ``fio_args``; check
    that no request waited for the timeout (a batch's record left open
    would); return the WRITEs per connection, fewest first."""
    before = stats(DEV)
    with server.lock:
        server.requests_by_port.clear()
    subprocess.run(
        ["fio", "--name=one-cpu", f"--filename=/dev/{DEV}", "--ioengine=libaio", "--direct=1",
         "--cpus_allowed=0", f"--size={EXPORT_SIZE}", "--output-format=terse", *fio_args],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    after = stats(DEV)
    assert (after["timeouts"], after["reconnects"], after["errors"]) == (
        before["timeouts"],
        before["reconnects"],
        before["errors"],
    )
    return sorted(writes_by_port(server).values())


def test_one_submitter_spreads_large_requests_over_the_set(dev0: str) -> None:
    """One thread on one CPU in batches blk-mq hands over with bd->last
    false: 256 KiB writes at depth 16 spill to the other connection once its
    own has a MiB more in flight; 4 KiB writes at depth 32 (128 KiB in
    flight) never do."""
    write(DEV, "request_timeout_ms", "5000")
    try:
        with fake_stack(DEV, EXPORT_ALL | EXPORT_MULTI_CONN) as (server, _):
            before = stats(DEV)
            shares = writes_from_one_cpu(
                server, "--rw=write", "--bs=256k", "--iodepth=16", "--iodepth_batch_submit=4",
                "--loops=4",
            )  # fmt: skip
            assert stats(DEV)["write_bytes"] - before["write_bytes"] >= 4 * EXPORT_SIZE
            print("256 KiB writes per connection:", shares)
            assert len(shares) == CONNECTIONS, shares
            assert shares[0] * 4 >= sum(shares) // CONNECTIONS, shares

            shares = writes_from_one_cpu(
                server, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--iodepth_batch_submit=8",
                "--number_ios=1024",
            )  # fmt: skip
            assert len(shares) == 1 and shares[0] >= 1024, shares
    finally:
        write(DEV, "request_timeout_ms", "30000")


def test_io_at_once_after_each_connect_completes_on_every_queue(dev0: str) -> None:
    """udev probes the disk the moment its capacity appears while the test
    writes on every CPU: nothing may wait for the request timeout."""
    write(DEV, "request_timeout_ms", "5000")
    start = stats(DEV)
    try:
        for attempt in range(10):
            before = stats(DEV)  # udev's probe starts with the connect
            with fake_stack(DEV, EXPORT_ALL | EXPORT_MULTI_CONN):
                with ThreadPoolExecutor(CONNECTIONS) as pool:
                    done = [
                        pool.submit(write_and_read_on, cpu, attempt) for cpu in range(CONNECTIONS)
                    ]
                    for future in done:
                        future.result(timeout=60)
                after = stats(DEV)
                assert (after["timeouts"], after["reconnects"], after["errors"]) == (
                    before["timeouts"],
                    before["reconnects"],
                    before["errors"],
                ), attempt
        # Also what was still in flight at a snapshot (udev's probe) and
        # ended after it, by the timeout or the disconnect's drain.
        end = stats(DEV)
        assert (end["timeouts"], end["reconnects"]) == (start["timeouts"], start["reconnects"])
    finally:
        write(DEV, "request_timeout_ms", "30000")


def write_and_read_on(cpu: int, attempt: int) -> None:
    data = bytes([attempt, cpu]) * 2048
    with on_cpu(cpu):
        dio_write(cpu << 20, data)
        assert dio_read(cpu << 20, len(data)) == data


def test_without_multi_conn_the_server_gets_one_connection(dev0: str) -> None:
    mark = kmsg_mark()
    with fake_stack(DEV, EXPORT_ALL) as (server, _):
        assert read(DEV, "connections") == "1"
        assert "export fake does not allow several connections; using one" in kmsg_since(mark)
        for cpu in range(CONNECTIONS):
            with on_cpu(cpu):
                dio_write(cpu << 20, bytes([cpu + 1]) * 4096)
                assert dio_read(cpu << 20, 4096) == bytes([cpu + 1]) * 4096
        assert len(writes_by_port(server)) == 1


def test_losing_one_connection_reconnects_the_set(dev0: str) -> None:
    with fake_stack(DEV, EXPORT_ALL | EXPORT_MULTI_CONN) as (server, _):
        before = stats(DEV)
        server.drop_next = OP_WRITE
        with on_cpu(1):
            dio_write(0, b"x" * 4096)  # requeued, sent again on the new set
        after = stats(DEV)
        assert after["reconnects"] - before["reconnects"] == 1
        assert after["errors"] == before["errors"]
        assert read(DEV, "state") == "connected"
        assert read(DEV, "connections") == str(CONNECTIONS)
        assert server.connections == 2 * CONNECTIONS
        assert bytes(server.data[:4096]) == b"x" * 4096
        with on_cpu(0):
            assert dio_read(0, 4096) == b"x" * 4096


def handshake_all(helper: Genl, dev: str, port: int) -> list[Accepted]:
    """Connect ``dev``, wait for the READY of every connection of its set,
    and ACCEPT them all with ``helper``."""
    with Genl() as events:  # ``helper``'s requests would skip multicasts
        events.join()
        configure(dev, "127.0.0.1", port, "fake")
        write(dev, "connect", "1")
        for _ in range(CONNECTIONS):
            events.next_event()
    accepted = [helper.accept() for _ in range(CONNECTIONS)]
    with pytest.raises(OSError) as err:
        helper.accept()
    assert err.value.errno == errno.ENOENT
    return accepted


def test_set_connects_after_the_last_done(dev0: str) -> None:
    server = FakeServer()
    try:
        with Genl() as helper:
            accepted = handshake_all(helper, DEV, server.port)
            for number, attempt in enumerate(accepted, 1):
                with socket.socket(fileno=os.dup(attempt.fd)) as sock:
                    assert server.keyed_event(sock.getsockname()[1]).wait(10)
                    install_ktls(sock, tx="c2s", rx="s2c")
                helper.done_ok(attempt, size=EXPORT_SIZE, flags=EXPORT_ALL | EXPORT_MULTI_CONN)
                os.close(attempt.fd)
                if number < CONNECTIONS:
                    assert read(DEV, "state") == "handshaking"
                    assert read(DEV, "connections") == "0"
            assert read(DEV, "state") == "connected"
            assert read(DEV, "connections") == str(CONNECTIONS)
    finally:
        server.close()


def test_one_failed_handshake_fails_the_set(dev0: str) -> None:
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        helper = stack.enter_context(Genl())
        first, second = handshake_all(helper, DEV, srv.getsockname()[1])
        peers = [stack.enter_context(srv.accept()[0]) for _ in range(CONNECTIONS)]
        helper.done_failed(second, errno.EACCES, "login denied: token does not match")
        assert read(DEV, "state") == "error"
        assert read(DEV, "last_error") == "login denied: token does not match"
        # The other handshake's attempt is over: its DONE names nothing.
        with pytest.raises(OSError) as err:
            helper.done_ok(first)
        assert err.value.errno == errno.ENOENT
        for fd in (first.fd, second.fd):
            os.close(fd)
        for peer in peers:
            peer.settimeout(10)
            assert peer.recv(1) == b"", "every connection of the set is closed"


def test_connections_that_disagree_fail_the_set(dev0: str) -> None:
    server = FakeServer()
    try:
        with Genl() as helper:
            accepted = handshake_all(helper, DEV, server.port)
            for number, attempt in enumerate(accepted):
                with socket.socket(fileno=attempt.fd) as sock:
                    assert server.keyed_event(sock.getsockname()[1]).wait(10)
                    install_ktls(sock, tx="c2s", rx="s2c")
                    size = EXPORT_SIZE + number * 4096
                    flags = EXPORT_ALL | EXPORT_MULTI_CONN
                    if number < CONNECTIONS - 1:
                        helper.done_ok(attempt, size=size, flags=flags)
                        continue
                    with pytest.raises(OSError) as err:
                        helper.done_ok(attempt, size=size, flags=flags)
                    assert err.value.errno == errno.EPROTO
        assert read(DEV, "state") == "error"
        assert read(DEV, "last_error") == "connections disagree about export fake"
        assert read(DEV, "size") == "0"
    finally:
        server.close()
