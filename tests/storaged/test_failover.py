"""Active and standby storaged on one RBD export (storaged/failover.py).

The lease's judgement is pure and tested as such; against the mini cluster
two storaged processes share one image: one serves, the other stands by
and answers UNAVAILABLE, a clean stop hands the export over at once, a
kill -9 or a SIGSTOP of the active makes the standby take over while a
verified write load goes on through a FailoverClient, and the old active,
resumed, cannot write.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netblk.protocol.constants import BLOCK_SIZE, LoginStatus
from netblk.tlsconf import client_context
from netblk.tomlconf import ConfigError
from storaged.client import FailoverClient, LoginError, NetblkError, Server
from storaged.config import (
    DEFAULT_LEASE_INTERVAL,
    DEFAULT_TAKEOVER_AFTER,
    FailoverPolicy,
    parse_config,
)
from storaged.failover import Lease, LeaseWatch
from tests.ceph_cluster import MiniCluster
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import ServerProcess, Stack, run

LEASE_INTERVAL = 0.5
TAKEOVER_AFTER = 2.0
FAILOVER = (
    "[failover]\n"
    'instance = "{name}"\n'
    f"lease_interval = {LEASE_INTERVAL}\n"
    f"takeover_after = {TAKEOVER_AFTER}\n"
)
#: The FailoverClient's: a SIGSTOPped server costs a request this long.
REQUEST_TIMEOUT = 3.0
DEAD_TIMEOUT = 30.0


# --- the lease ----------------------------------------------------------------


def test_a_lease_reads_back_as_written_and_garbage_is_no_lease() -> None:
    lease = Lease("storaged-a", 41)
    assert Lease.decode(lease.encode()) == lease
    for raw in (b"", b"\x00" * 8, b"[]", b'{"instance": "a"}', b'{"beat": 1}', b"{"):
        assert Lease.decode(raw) is None


def test_a_lease_is_stale_only_after_takeover_after_without_change() -> None:
    watch = LeaseWatch(takeover_after=5.0)
    assert not watch.stale(b"1", now=100.0)  # the first look starts the clock
    assert not watch.stale(b"1", now=104.9)
    assert not watch.stale(b"2", now=104.95)  # a beat: the clock starts again
    assert not watch.stale(b"2", now=109.9)
    assert watch.stale(b"2", now=109.95)
    assert not watch.stale(b"3", now=110.0)


def test_no_lease_at_all_is_stale_after_the_same_wait() -> None:
    """An owner that died before its first beat leaves no lease: the
    standby still waits the whole takeover_after from its first look."""
    watch = LeaseWatch(takeover_after=2.0)
    assert not watch.stale(b"", now=0.0)
    assert not watch.stale(b"", now=1.9)
    assert watch.stale(b"", now=2.0)


# --- config -------------------------------------------------------------------


def failover_config(body: str, tmp_path: Path) -> FailoverPolicy:
    data = {
        "tls": {"cert": "c", "key": "k", "ca": "a"},
        "failover": json.loads(body) if body else {},
    }
    return parse_config(data, tmp_path).failover


def test_failover_settings_default_and_parse(tmp_path: Path) -> None:
    policy = failover_config("", tmp_path)
    assert policy.lease_interval == DEFAULT_LEASE_INTERVAL
    assert policy.takeover_after == DEFAULT_TAKEOVER_AFTER
    assert policy.instance.endswith(":10910")
    policy = failover_config(
        '{"instance": "a", "lease_interval": 0.25, "takeover_after": 1}', tmp_path
    )
    assert (policy.instance, policy.lease_interval, policy.takeover_after) == ("a", 0.25, 1.0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"lease_interval": 0}', "failover.lease_interval: must be positive"),
        ('{"takeover_after": -1}', "failover.takeover_after: must be positive"),
        ('{"lease_interval": 2, "takeover_after": 3}', "at least twice failover.lease_interval"),
        ('{"instance": ""}', "failover.instance: must be a non-empty printable name"),
        ('{"instance": "a\\nb"}', "failover.instance: must be a non-empty printable name"),
        ('{"instance": 7}', "failover.instance"),
        ('{"standby": true}', "failover.standby: unknown setting"),
    ],
)
def test_bad_failover_settings_are_refused_by_name(body: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        failover_config(body, tmp_path)


# --- two instances on one image -------------------------------------------------


@pytest.fixture
def pair(
    pki: PkiFiles, tmp_path: Path, ceph: MiniCluster
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Instances "a" (started first: the active) and "b" (its standby)."""
    first = Stack(
        pki=pki,
        root=tmp_path / "a",
        ceph=ceph,
        volume_size=16 << 20,
        extra_config=FAILOVER.format(name="a"),
    )
    second = Stack(pki=pki, root=tmp_path / "b", twin=first, extra_config=FAILOVER.format(name="b"))
    a, b = ServerProcess(first), ServerProcess(second)
    try:
        a.start()
        b.start()
        wait_for(lambda: role(b) == "standby")
        assert role(a) == "active"
        yield a, b
    finally:
        for proc in (a, b):
            if proc.proc is not None and proc.proc.poll() is None:
                os.kill(proc.proc.pid, signal.SIGCONT)
            proc.stop()


def role(server: ServerProcess, export: str = "data") -> str:
    return str(server.stack.snapshot()["volumes"][export].get("role"))


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {condition}")
        time.sleep(0.1)


def events(server: ServerProcess) -> list[str]:
    """The ``event`` of every JSON line the instance logged."""
    found = []
    for line in server.log_path.read_text().splitlines():
        try:
            found.append(json.loads(line).get("event"))
        except ValueError:
            continue
    return found


def failover_client(a: ServerProcess, b: ServerProcess) -> FailoverClient:
    stack = a.stack
    cert, key = stack.client_tls("alice")
    return FailoverClient(
        [Server("127.0.0.1", a.stack.port), Server("127.0.0.1", b.stack.port)],
        ssl_context=client_context(stack.pki.ca_cert, cert, key),
        export="data",
        token=stack.tokens["alice"].encode(),
        server_hostname="localhost",
        request_timeout=REQUEST_TIMEOUT,
        dead_timeout=DEAD_TIMEOUT,
    )


class WriteLoad:
    """Writers on disjoint blocks, each write recorded in a model once
    acknowledged; any failed write is a lost one and is kept."""

    def __init__(self, client: FailoverClient, size: int, seed: int) -> None:
        self.client = client
        self.size = size
        self.model = bytearray(size)
        self.errors: list[BaseException] = []
        self.done = 0
        self.slowest = 0.0
        self._rng = random.Random(seed)

    async def run(self, seconds: float, workers: int = 8) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        blocks = self.size // BLOCK_SIZE

        async def writer(worker: int) -> None:
            while loop.time() < deadline:
                block = self._rng.randrange(worker, blocks, workers)
                data = os.urandom(BLOCK_SIZE)
                started = loop.time()
                try:
                    await self.client.write(block * BLOCK_SIZE, data, fua=self._rng.random() < 0.1)
                except Exception as exc:  # a failed write is a lost one: kept
                    self.errors.append(exc)
                    return
                self.slowest = max(self.slowest, loop.time() - started)
                self.model[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE] = data
                self.done += 1

        await asyncio.gather(*(writer(worker) for worker in range(workers)))

    async def verify(self) -> None:
        chunk = 1 << 20
        for start in range(0, self.size, chunk):
            assert await self.client.read(start, chunk) == self.model[start : start + chunk]


@pytest.mark.ceph
def test_the_standby_refuses_logins_until_a_clean_stop_hands_it_the_export(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with pytest.raises(LoginError) as refused:
        run(b.stack.connect())
    assert refused.value.status is LoginStatus.UNAVAILABLE
    assert b.stack.snapshot()["logins_failed"].get("unavailable") == 1

    assert a.signal(signal.SIGTERM) == 0
    # The lock was released, not broken: the standby takes it at its next look.
    wait_for(lambda: role(b) == "active", timeout=5 * LEASE_INTERVAL + 5)
    assert "released" in events(a)
    assert "takeover" not in events(b)

    async def use() -> None:
        async with await b.stack.connect() as client:
            await client.write(0, b"b" * BLOCK_SIZE)
            assert await client.read(0, BLOCK_SIZE) == b"b" * BLOCK_SIZE

    run(use())


@pytest.mark.ceph
def test_kill_9_of_the_active_under_a_verified_write_load_loses_nothing(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """The standby takes over once the lease is stale, the client resends
    what was unanswered to it: every write succeeds and reads back."""
    a, b = pair

    async def body() -> WriteLoad:
        async with failover_client(a, b) as client:
            load = WriteLoad(client, a.stack.volume_size, seed=9)
            killer = asyncio.get_running_loop().run_in_executor(
                None, lambda: (time.sleep(2), a.signal(signal.SIGKILL))
            )
            await load.run(12)
            await killer
            await client.flush()
            await load.verify()
            assert client.current == Server("127.0.0.1", b.stack.port)
            assert client.failovers == 1
            return load

    load = run(body())
    assert isinstance(load, WriteLoad)
    assert load.errors == []
    assert load.done > 0
    print(f"kill -9: {load.done} writes, the slowest took {load.slowest:.1f} s")
    assert role(b) == "active"
    assert "takeover" in events(b)
    assert b.stack.snapshot()["volumes"]["data"]["activations"] == 1


@pytest.mark.ceph
def test_a_stopped_active_is_taken_over_and_once_resumed_cannot_write(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """SIGSTOP the active: its lease goes stale, the standby breaks its lock
    (Ceph blocklists it) and serves.  SIGCONT: a write sent to the old active
    on a connection it kept fails, the block keeps what the new active
    wrote, and the old active stands by again."""
    a, b = pair
    assert a.proc is not None
    stale = b"a" * BLOCK_SIZE
    fresh = b"b" * BLOCK_SIZE

    async def body() -> WriteLoad:
        old = await a.stack.connect()
        async with failover_client(a, b) as client:
            load = WriteLoad(client, a.stack.volume_size, seed=19)
            await load.run(2)
            os.kill(a.proc.pid, signal.SIGSTOP)
            await load.run(10)
            assert client.current == Server("127.0.0.1", b.stack.port)
            await client.write(0, fresh)
            load.model[:BLOCK_SIZE] = fresh
            os.kill(a.proc.pid, signal.SIGCONT)
            with pytest.raises(NetblkError):
                await old.write(0, stale)
                await old.flush()
            old.abort()
            assert await client.read(0, BLOCK_SIZE) == fresh
            await load.verify()
            return load

    load = run(body())
    assert isinstance(load, WriteLoad)
    assert load.errors == []
    wait_for(lambda: role(a) == "standby")
    assert "fenced" in events(a)
    assert "takeover" in events(b)
