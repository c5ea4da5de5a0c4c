"""The kernel side of the upcall: generic netlink sockets (pyroute2).

One socket joins the "handshake" multicast group and only reads READY
events; the other sends ACCEPT and DONE and reads their answers, so an
answer is never taken for an event.  Both run on the daemon's event loop.
The fd that ACCEPT installs lands in this process whichever socket asked.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket  # type: ignore[import-untyped]

from netblk.protocol.constants import GENL_MCGRP_HANDSHAKE, GENL_NAME, GenlCmd
from tls_bridge.genl import (
    Done,
    EventsLost,
    HandshakeRequest,
    NetblkGenlMsg,
    Ready,
    accept_message,
    done_message,
    parse_accept_reply,
    parse_ready,
)

log = logging.getLogger("tls_bridge.netlink")

#: The driver answers ACCEPT and DONE from its handler at once; a longer
#: silence means something is wrong, not slow.
REQUEST_TIMEOUT = 5.0


class UpcallUnavailable(Exception):
    """The netblk family or its group is missing, or we may not use it."""


class GenlUpcall:
    """The real upcall transport; see daemon.Upcall for the contract."""

    def __init__(self, events: Any, requests: Any) -> None:
        self._events = events
        self._requests = requests

    @classmethod
    async def open(cls) -> GenlUpcall:
        events = AsyncGenericNetlinkSocket()
        requests = AsyncGenericNetlinkSocket()
        try:
            await events.bind(GENL_NAME, NetblkGenlMsg)
            events.add_membership(GENL_MCGRP_HANDSHAKE)
            await requests.bind(GENL_NAME, NetblkGenlMsg)
        except (NetlinkError, OSError, KeyError) as exc:
            events.close()
            requests.close()
            raise UpcallUnavailable(_unavailable_reason(exc)) from None
        return cls(events, requests)

    def close(self) -> None:
        self._events.close()
        self._requests.close()

    async def events(self) -> AsyncIterator[Ready | EventsLost]:
        while True:
            try:
                async for msg in self._events.get():
                    if msg["cmd"] == GenlCmd.READY:
                        yield parse_ready(msg)
            except (NetlinkError, OSError) as exc:
                code = _code(exc)
                if code != errno.ENOBUFS:
                    raise OSError(code, f"reading READY events: {exc}") from exc
                yield EventsLost()

    async def accept(self) -> HandshakeRequest | None:
        try:
            replies = await self._request(accept_message(), NLM_F_REQUEST)
        except OSError as exc:
            # Typically another helper took the socket or its deadline passed.
            log.debug("nothing to accept", extra={"event": "accept_empty", "errno": exc.errno})
            return None
        return parse_accept_reply(replies[0]) if replies else None

    async def done(self, done: Done) -> None:
        await self._request(done_message(done), NLM_F_REQUEST | NLM_F_ACK)

    async def _request(self, msg: NetblkGenlMsg, flags: int) -> list[Any]:
        """Send one request; its answers, or OSError with the kernel's errno."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                answer = await self._requests.nlm_request(
                    msg, msg_type=self._requests.prid, msg_flags=flags
                )
                return [reply async for reply in answer]
        except NetlinkError as exc:
            raise OSError(exc.code, os.strerror(exc.code)) from None


def _code(exc: Exception) -> int | None:
    return exc.code if isinstance(exc, NetlinkError) else getattr(exc, "errno", None)


def _unavailable_reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"the {GENL_NAME!r} netlink family has no {GENL_MCGRP_HANDSHAKE!r} group"
    code = _code(exc)
    if code == errno.ENOENT:
        return f"generic netlink family {GENL_NAME!r} not found: is netblk.ko loaded?"
    if code in (errno.EPERM, errno.EACCES):
        return f"may not join the {GENL_NAME!r} handshake group: tls-bridge needs CAP_NET_ADMIN"
    return f"cannot open the {GENL_NAME!r} netlink family: {exc}"
