"""The netlink shell (GenlUpcall) over fake pyroute2 sockets, and its clear
error on a host where netblk.ko is not loaded."""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError

from netblk.protocol.constants import GenlCmd
from tests.tls_bridge.genl_bytes import ACCEPT_REPLY, FAMILY_ID, kernel_message
from tls_bridge import netlink
from tls_bridge.genl import Done, EventsLost, NetblkGenlMsg, Ready
from tls_bridge.netlink import GenlUpcall, UpcallUnavailable

Answer = list[NetblkGenlMsg] | Exception | None  # None: the kernel never answers


class FakeSocket:
    """The parts of pyroute2's AsyncGenericNetlinkSocket GenlUpcall uses."""

    prid = FAMILY_ID

    def __init__(self) -> None:
        self.batches: asyncio.Queue[list[NetblkGenlMsg] | Exception] = asyncio.Queue()
        self.answers: deque[Answer] = deque()
        self.sent: list[tuple[int, int, int, list[Any]]] = []
        self.closed = False

    async def get(self) -> AsyncIterator[NetblkGenlMsg]:
        batch = await self.batches.get()
        if isinstance(batch, Exception):
            raise batch
        for msg in batch:
            yield msg

    async def nlm_request(
        self, msg: NetblkGenlMsg, msg_type: int, msg_flags: int
    ) -> AsyncIterator[NetblkGenlMsg]:
        self.sent.append((msg["cmd"], msg_type, msg_flags, list(msg["attrs"])))
        answer = self.answers.popleft()

        async def replies() -> AsyncIterator[NetblkGenlMsg]:
            if answer is None:
                await asyncio.Event().wait()
            if isinstance(answer, Exception):
                raise answer
            for reply in answer or []:
                yield reply

        return replies()

    def close(self) -> None:
        self.closed = True


def upcall() -> tuple[GenlUpcall, FakeSocket, FakeSocket]:
    events, requests = FakeSocket(), FakeSocket()
    return GenlUpcall(events, requests), events, requests


def test_events_yield_ready_skip_other_commands_and_report_overruns() -> None:
    async def body() -> None:
        up, events, _ = upcall()
        events.batches.put_nowait([kernel_message(GenlCmd.DONE), kernel_message(GenlCmd.READY)])
        events.batches.put_nowait(NetlinkError(errno.ENOBUFS))
        events.batches.put_nowait([kernel_message(GenlCmd.READY)])
        events.batches.put_nowait(NetlinkError(errno.EBADF))
        seen = []
        with pytest.raises(OSError, match="reading READY events") as info:
            async for event in up.events():
                seen.append(event)
        assert seen == [Ready(), EventsLost(), Ready()]
        assert info.value.errno == errno.EBADF

    asyncio.run(body())


def test_accept_asks_without_ack_and_parses_the_reply() -> None:
    async def body() -> None:
        up, _, requests = upcall()
        requests.answers.extend([[kernel_message(GenlCmd.ACCEPT, *ACCEPT_REPLY)], []])
        requests.answers.append(NetlinkError(errno.ENOENT))
        request = await up.accept()
        assert request is not None
        assert (request.cookie, request.sockfd, request.export) == (
            0xFEED_0000_0000_0001,
            9,
            "data",
        )
        assert requests.sent[0] == (GenlCmd.ACCEPT, FAMILY_ID, NLM_F_REQUEST, [])
        assert await up.accept() is None  # no reply
        assert await up.accept() is None  # nothing waiting

    asyncio.run(body())


def test_done_wants_an_ack_and_turns_kernel_errors_into_oserror() -> None:
    async def body() -> None:
        up, _, requests = upcall()
        requests.answers.extend([[], NetlinkError(errno.ESTALE)])
        done = Done(cookie=5, sockfd=7, status=errno.EACCES, reason="nope")
        await up.done(done)
        cmd, msg_type, flags, attrs = requests.sent[0]
        assert (cmd, msg_type, flags) == (GenlCmd.DONE, FAMILY_ID, NLM_F_REQUEST | NLM_F_ACK)
        assert ("NETBLK_GENL_A_REASON", "nope") in attrs
        with pytest.raises(OSError, match="Stale") as info:
            await up.done(done)
        assert info.value.errno == errno.ESTALE

    asyncio.run(body())


def test_a_silent_kernel_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlink, "REQUEST_TIMEOUT", 0.05)

    async def body() -> None:
        up, _, requests = upcall()
        requests.answers.append(None)
        with pytest.raises(TimeoutError):
            await up.done(Done(cookie=1, sockfd=3, status=0))
        up.close()
        assert requests.closed

    asyncio.run(body())


def test_open_without_the_driver_says_so() -> None:
    async def body() -> None:
        try:
            up = await GenlUpcall.open()
        except UpcallUnavailable as exc:
            assert "netblk" in str(exc)
            assert "is netblk.ko loaded?" in str(exc) or "CAP_NET_ADMIN" in str(exc)
        else:
            up.close()
            pytest.skip("netblk.ko is loaded here")

    asyncio.run(body())
