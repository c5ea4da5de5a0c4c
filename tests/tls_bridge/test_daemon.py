"""The bridge loop against a fake kernel (fake_kernel.py) and a real
storaged.  The handshakes are the real ones over the userspace record layer
(no kTLS on the host); tests/vm/test_ktls.py repeats the core of this with
kernel TLS.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import time
from collections.abc import Iterator

import pytest

from netblk.protocol.constants import ExportFlag
from tests.storaged.stack import VOLUME_SIZE, Stack
from tests.tls_bridge.fake_kernel import FakeKernel, bridge_until, config_for
from tests.tls_bridge.support import server_entry
from tests.tls_bridge.userspace_tls import userspace_install
from tls_bridge.config import ServerEntry
from tls_bridge.daemon import Bridge, Handshake
from tls_bridge.genl import EventsLost
from tls_bridge.login import LoginResult, handshake_and_login

HANDSHAKE: Handshake = functools.partial(handshake_and_login, install=userspace_install)


@pytest.fixture
def kernel(storaged: Stack) -> Iterator[FakeKernel]:
    fake = FakeKernel(storaged.port)
    yield fake
    fake.close()


def test_concurrent_handshakes_each_get_their_done(
    storaged: Stack, kernel: FakeKernel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        ok, forbidden, missing = kernel.post("data"), kernel.post("other"), kernel.post("nope")
        unknown = kernel.post("data", peer="192.0.2.99")
        await bridge_until(kernel, config_for(server_entry(storaged)), 4, HANDSHAKE)
        good = kernel.dones[ok]
        assert (good.status, good.reason) == (0, "")
        assert good.geometry is not None
        assert good.geometry.size == VOLUME_SIZE
        assert good.geometry.flags & ExportFlag.SEND_FLUSH
        assert kernel.dones[forbidden].status == errno.EACCES
        assert "FORBIDDEN" in kernel.dones[forbidden].reason
        assert kernel.dones[missing].status == errno.ENOENT
        assert kernel.dones[unknown].status == errno.ENOKEY
        assert "no [[servers]] entry for 192.0.2.99:" in kernel.dones[unknown].reason
        assert all(kernel.fd_closed(cookie) for cookie in kernel.dones)
        assert kernel.max_in_flight > 1  # they really ran side by side

    asyncio.run(body())
    ours = [record for record in caplog.records if record.name == "tls_bridge"]
    events = [record.__dict__.get("event") for record in ours]
    assert events.count("login_ok") == 1
    assert events.count("login_failed") == 3
    ok_record = next(r for r in ours if r.__dict__.get("event") == "login_ok")
    assert ok_record.__dict__["cipher"] == "TLS_AES_256_GCM_SHA384"
    assert ok_record.__dict__["peer"] == f"127.0.0.1:{storaged.port}"
    everything = " ".join(str(r.__dict__) for r in caplog.records)
    for token in storaged.tokens.values():
        assert token not in everything


def test_waiting_sockets_are_served_at_start_and_after_lost_events(
    storaged: Stack, kernel: FakeKernel
) -> None:
    async def body() -> None:
        early = [kernel.post(ready=False), kernel.post(ready=False)]
        await bridge_until(kernel, config_for(server_entry(storaged)), 2, HANDSHAKE)
        assert all(kernel.dones[c].status == 0 for c in early)
        late = kernel.post(ready=False)
        await bridge_until(
            kernel, config_for(server_entry(storaged)), 3, HANDSHAKE, before=[EventsLost()]
        )
        assert kernel.dones[late].status == 0

    asyncio.run(body())


def test_max_concurrent_bounds_the_accepted_sockets(storaged: Stack, kernel: FakeKernel) -> None:
    async def body() -> None:
        cookies = [kernel.post() for _ in range(3)]
        await bridge_until(
            kernel, config_for(server_entry(storaged), max_concurrent=1), 3, HANDSHAKE
        )
        assert kernel.max_in_flight == 1
        assert all(kernel.dones[c].status == 0 for c in cookies)

    asyncio.run(body())


def test_malformed_accept_is_failed_and_its_fd_closed(storaged: Stack, kernel: FakeKernel) -> None:
    async def body() -> None:
        bad, good = kernel.post(malformed=True), kernel.post()
        await bridge_until(kernel, config_for(server_entry(storaged)), 2, HANDSHAKE)
        assert kernel.dones[bad].status == errno.EPROTO
        assert "lacks EXPORT" in kernel.dones[bad].reason
        assert kernel.fd_closed(bad)
        assert kernel.dones[good].status == 0

    asyncio.run(body())


def test_a_crashing_handshake_is_reported_not_fatal(
    storaged: Stack, kernel: FakeKernel, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def flaky(sock: socket.socket, server: ServerEntry, export: str, timeout: float) -> LoginResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return HANDSHAKE(sock, server, export, timeout)

    async def body() -> None:
        first, second = kernel.post(), kernel.post()
        await bridge_until(kernel, config_for(server_entry(storaged), max_concurrent=1), 2, flaky)
        assert kernel.dones[first].status == errno.EIO
        assert "internal error" in kernel.dones[first].reason
        assert kernel.dones[second].status == 0
        assert kernel.fd_closed(first)

    asyncio.run(body())
    assert any("RuntimeError: bug" in (r.exc_text or "") for r in caplog.records)


def test_a_refused_done_still_closes_the_fd(storaged: Stack, kernel: FakeKernel) -> None:
    async def body() -> None:
        first = kernel.post()
        kernel.refuse_done.add(first)
        second = kernel.post()
        await bridge_until(kernel, config_for(server_entry(storaged)), 2, HANDSHAKE)
        assert kernel.fd_closed(first)
        assert kernel.dones[second].status == 0

    asyncio.run(body())


def test_stop_lets_a_running_handshake_finish(storaged: Stack, kernel: FakeKernel) -> None:
    def slow(sock: socket.socket, server: ServerEntry, export: str, timeout: float) -> LoginResult:
        time.sleep(0.5)
        return HANDSHAKE(sock, server, export, timeout)

    async def body() -> None:
        cookie = kernel.post()
        stop = asyncio.Event()
        run = asyncio.create_task(
            Bridge(config_for(server_entry(storaged)), kernel, slow).run(stop)
        )
        while kernel.in_flight == 0:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(run, 30)
        assert kernel.dones[cookie].status == 0
        assert kernel.fd_closed(cookie)

    asyncio.run(body())
