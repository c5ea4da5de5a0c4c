"""What the API does to a device: read it, change its config, connect and
disconnect it, each answer an ``ApiError`` or a snapshot.

Requests for one device are serialized: a per-device lock is held across the
state check, the writes and any wait, so the check still holds when the
write lands and a wait reports on its own request.  A queued disconnect cuts
a wait in progress short (it is how an operator gives up on a hung connect).
The driver is the final judge: whatever another writer did in between, its
errno becomes a clean answer (``REFUSALS``).  Sysfs I/O runs on worker
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from netblk_admin.sysfs import (
    IDLE,
    TARGET_ATTRS,
    TRANSIENT,
    DeviceNotFound,
    DeviceTree,
    Snapshot,
    State,
    SysfsError,
)

log = logging.getLogger("netblk_admin")

T = TypeVar("T")
Action = Literal["connect", "disconnect"]

#: How often a wait reads ``state`` (the driver offers no notification).
POLL_INTERVAL = 0.05
GOALS: Mapping[Action, State] = {"connect": State.CONNECTED, "disconnect": State.DISCONNECTED}

#: The driver's errnos on a write (kmod/README.md): status, reason, words.
REFUSALS: Mapping[int, tuple[int, str, str]] = {
    errno.EBUSY: (409, "busy", "the driver refused: the device is not disconnected or in error"),
    errno.EINVAL: (422, "invalid_value", "the driver refused the value"),
    errno.EDESTADDRREQ: (409, "no_target", "no server (servers or server_ip) or no export set"),
    errno.ENODEV: (503, "unloading", "netblk.ko is being unloaded"),
}


class ApiError(Exception):
    """An answer other than success; rendered as an ``ErrorBody``."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        state: State | None = None,
        last_error: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.state = state
        self.last_error = last_error
        self.headers = headers


def refusal(exc: SysfsError, written: list[str] | None = None) -> ApiError:
    status, reason, words = REFUSALS.get(exc.errno, (503, "sysfs_error", ""))
    detail = f"{exc.attr}: {words}" if words else str(exc)
    if written:
        detail += f" (already written: {', '.join(written)})"
    return ApiError(status, reason, detail)


@dataclass
class _Guard:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Disconnects waiting for the lock; a wait in progress gives way to them.
    preempting: int = 0


class DeviceControl:
    def __init__(self, tree: DeviceTree) -> None:
        self.tree = tree
        # One entry per device that exists (names are checked first), so bounded.
        self._guards: dict[str, _Guard] = {}

    async def snapshot(self, name: str) -> Snapshot:
        return await self._io(self.tree.snapshot, name)

    async def snapshots(self) -> list[Snapshot]:
        """Every device; one that vanishes meanwhile (rmmod) is left out."""
        return await self._io(self._all_snapshots)

    async def check_root(self) -> int:
        """How many devices there are; ApiError 503 if the root is unreadable."""
        return len(await self._io(self.tree.names))

    async def configure(self, name: str, values: Mapping[str, str], who: str) -> Snapshot:
        """Write ``values`` (attribute -> text, already validated) in order."""
        await self._io(self.tree.state, name)  # 404 before a lock exists for the name
        async with self._exclusive(name, preempt=False):
            await self._io(self._write_config, name, values)
            log.info(
                "config changed",
                extra={"event": "configured", "device": name, "token": who, "values": values},
            )
            return await self._io(self.tree.snapshot, name)

    async def act(
        self, name: str, action: Action, who: str, wait_for: float | None
    ) -> tuple[bool, Snapshot]:
        """Connect or disconnect; with ``wait_for`` seconds, until the state
        settles.  Returns whether it settled in the goal state, and the device."""
        await self._io(self.tree.state, name)
        async with self._exclusive(name, preempt=action == "disconnect"):
            await self._io(self._start, name, action)
            log.info(action, extra={"event": action, "device": name, "token": who})
            if wait_for is None:
                return False, await self._io(self.tree.snapshot, name)
            state = await self._settle(name, wait_for)
            snapshot = await self._io(self.tree.snapshot, name)
        if state == GOALS[action]:
            return True, snapshot
        last_error = snapshot.last_error or None
        if state == State.ERROR and action == "connect":
            raise ApiError(
                502,
                "connect_failed",
                last_error or "the connection attempt failed",
                state=state,
                last_error=last_error,
            )
        raise ApiError(409, "interrupted", f"{name} ended {state}", state=state)

    def _all_snapshots(self) -> list[Snapshot]:
        snapshots = []
        for name in self.tree.names():
            with contextlib.suppress(DeviceNotFound):
                snapshots.append(self.tree.snapshot(name))
        return snapshots

    def _write_config(self, name: str, values: Mapping[str, str]) -> None:
        if not values.keys().isdisjoint(TARGET_ATTRS):
            self._require_idle(name, "servers, server_ip, server_port and export change")
        written: list[str] = []
        for attr, value in values.items():
            try:
                self.tree.write(name, attr, value)
            except SysfsError as exc:
                raise refusal(exc, written) from None
            written.append(attr)

    def _start(self, name: str, action: Action) -> None:
        if action == "connect":
            self._require_idle(name, "connect works")
        try:
            self.tree.write(name, action, "1")
        except SysfsError as exc:
            raise refusal(exc) from None

    def _require_idle(self, name: str, what: str) -> None:
        state = self.tree.state(name)
        if state not in IDLE:
            raise ApiError(
                409,
                "busy",
                f"{name} is {state}: {what} only while disconnected or in error",
                state=state,
            )

    async def _settle(self, name: str, timeout: float) -> State:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        guard = self._guards[name]
        while (state := await self._io(self.tree.state, name)) in TRANSIENT:
            if guard.preempting:
                raise ApiError(
                    409, "preempted", "a disconnect request arrived while waiting", state=state
                )
            if loop.time() >= deadline:
                raise ApiError(504, "timeout", f"still {state} after {timeout:g} s", state=state)
            await asyncio.sleep(POLL_INTERVAL)
        return state

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str, *, preempt: bool) -> AsyncIterator[None]:
        guard = self._guards.setdefault(name, _Guard())
        guard.preempting += int(preempt)
        try:
            await guard.lock.acquire()
        finally:
            guard.preempting -= int(preempt)
        try:
            yield
        finally:
            guard.lock.release()

    @staticmethod
    async def _io(function: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(function, *args)
        except DeviceNotFound as exc:
            raise ApiError(404, "unknown_device", f"no netblk device {exc.name!r}") from None
        except SysfsError as exc:
            raise refusal(exc) from None
