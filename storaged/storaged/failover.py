"""Active and standby storaged for exports on RBD images.

Every storaged whose config lists an RBD export serves it, one at a time.
The active holds the image's managed exclusive lock, which is Ceph's fence:
breaking it blocklists the old owner, whose later writes then fail.  The
active also beats a lease, a small RADOS object beside the image, every
``lease_interval``.  A standby opens the image and unlocks the volume key at
start (so taking over costs no argon2id), then reads the lease as often; once
the lease has not changed for ``takeover_after`` seconds of the standby's
own clock (clocks are never compared across machines), it breaks the lock,
takes it and serves.  Clients find the new active by trying their next
server: a standby answers their login UNAVAILABLE.

An active that finds itself blocklisted (its lease write or a request fails
with ESHUTDOWN) has been taken over: it drops the export's sessions without
answering what they had in flight (their clients resend it to the new
active) and becomes a standby again, on a new cluster connection.  An active
that stops cleanly releases the lock, and a standby takes it at its next
look, without waiting for the lease to go stale.

``LeaseWatch`` is the decision, pure; ``Ownership`` is its I/O shell, one
asyncio task per export, every blocking librbd call on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from storaged._engine import RbdStore
from storaged.config import FailoverPolicy, RbdImage
from storaged.volume import Volume

log = logging.getLogger(__name__)

#: How long to wait before opening the image again after a failure.
REOPEN_DELAY = 2.0
#: The RADOS object, beside the image, that the active's lease lives in.
LEASE_OBJECT = "netblk_lease.{image}"


@dataclass(frozen=True)
class Lease:
    """What the active writes at every beat: who it is and a count that
    changes each time, so that a reader sees the lease move."""

    instance: str
    beat: int

    def encode(self) -> bytes:
        return json.dumps({"instance": self.instance, "beat": self.beat}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Lease | None:
        """The lease in ``raw``, or None if it holds none (empty, garbage)."""
        try:
            data = json.loads(raw)
            return cls(str(data["instance"]), int(data["beat"]))
        except (ValueError, TypeError, KeyError):
            return None


class LeaseWatch:
    """A standby's judgement of the active's lease: stale once its bytes
    have not changed for ``takeover_after`` seconds, timed from the first
    look (a standby that just started waits the whole time)."""

    def __init__(self, takeover_after: float) -> None:
        self.takeover_after = takeover_after
        self._seen: bytes | None = None
        self._since = 0.0

    def stale(self, raw: bytes, now: float) -> bool:
        """Look at the lease as read at ``now`` (a monotonic clock)."""
        if raw != self._seen:
            self._seen = raw
            self._since = now
            return False
        return now - self._since >= self.takeover_after


#: Opens the export's volume on a new cluster connection (blocking).
Opener = Callable[[], Volume]


class Ownership:
    """Serves one RBD export whenever this instance holds its lock.

    ``prepare`` opens the volume (at start: a failure there is a config
    error); ``run`` then stands by or serves until cancelled.  ``activate``
    and ``deactivate`` are how the server starts and stops taking the
    export's logins; ``deactivate`` also drops its sessions.
    """

    def __init__(
        self,
        export: str,
        image: RbdImage,
        policy: FailoverPolicy,
        open_volume: Opener,
        activate: Callable[[Volume], None],
        deactivate: Callable[[], None],
    ) -> None:
        self.export = export
        self.policy = policy
        self.lease_object = LEASE_OBJECT.format(image=image.image)
        self._open_volume = open_volume
        self._activate = activate
        self._deactivate = deactivate
        self.volume: Volume | None = None
        self.role = "starting"
        self.activations = 0

    def _log(self, level: int, msg: str, event: str, **fields: object) -> None:
        extra = {"event": event, "export": self.export, "instance": self.policy.instance}
        log.log(level, msg, extra=extra | fields)

    async def prepare(self) -> None:
        """Open the volume and, if nobody holds the lock, serve at once."""
        volume = self.volume = await asyncio.to_thread(self._open_volume)
        if await self._take_free_lock(volume.rbd_store):
            await self._become_active(volume)

    async def run(self) -> None:
        """Serve or stand by, and after being fenced stand by again."""
        while True:
            if self.volume is None:
                try:
                    self.volume = await asyncio.to_thread(self._open_volume)
                except OSError as exc:
                    self._log(logging.ERROR, "cannot open the image", "rbd_error", error=str(exc))
                    await asyncio.sleep(REOPEN_DELAY)
                    continue
            volume = self.volume
            try:
                if self.role != "active":
                    await self._stand_by(volume)
                    await self._become_active(volume)
                await self._beat(volume)
            except OSError as exc:
                self._log(logging.ERROR, "lost the image", "rbd_error", error=str(exc))
                await asyncio.sleep(REOPEN_DELAY)
            # Fenced, or the cluster failed us: that connection is done (a
            # blocklisted one refuses everything), so start afresh.
            if self.role == "active":
                self._deactivate()
            self.role = "standby"
            self.volume = None
            volume.close(flush=False)

    async def _stand_by(self, volume: Volume) -> None:
        """Return once this instance holds the image's lock."""
        store = volume.rbd_store
        watch = LeaseWatch(self.policy.takeover_after)
        loop = asyncio.get_running_loop()
        self.role = "standby"
        self._log(logging.INFO, "standing by", "standby")
        while not await self._take_free_lock(store):
            raw = await asyncio.to_thread(store.read_object, self.lease_object)
            if watch.stale(raw, loop.time()):
                await self._break(store, Lease.decode(raw))
            else:
                await asyncio.sleep(self.policy.lease_interval)

    @staticmethod
    async def _take_free_lock(store: RbdStore) -> bool:
        """Take the lock if nobody holds it.  Never ask librbd for a lock
        that is held: it asks the owner to let go and, when the owner is
        dead, waits for the owner's watch to time out (about 30 s)."""
        if await asyncio.to_thread(store.lock_owners):
            return False
        return await asyncio.to_thread(store.lock)

    async def _break(self, store: RbdStore, lease: Lease | None) -> None:
        owners = await asyncio.to_thread(store.lock_owners)
        self._log(
            logging.WARNING,
            "the active's lease is stale: taking over",
            "takeover",
            stale_for=self.policy.takeover_after,
            active=lease.instance if lease else None,
            owners=owners,
        )
        for owner in owners:
            await asyncio.to_thread(store.break_lock, owner)

    async def _become_active(self, volume: Volume) -> None:
        await asyncio.to_thread(volume.rbd_store.write_object, self.lease_object, self._lease(0))
        self._activate(volume)
        self.role = "active"
        self.activations += 1
        self._log(logging.INFO, "serving as the active", "active")

    async def _beat(self, volume: Volume) -> None:
        """Beat the lease while serving; return once fenced."""
        store = volume.rbd_store
        beat = 0
        while not store.fenced:
            await asyncio.sleep(self.policy.lease_interval)
            beat += 1
            try:
                await asyncio.to_thread(store.write_object, self.lease_object, self._lease(beat))
            except OSError as exc:
                if not store.fenced:
                    # Keep serving: should a standby take over meanwhile,
                    # the lock break fences us.
                    self._log(logging.WARNING, "lease write failed", "lease_failed", error=str(exc))
        self._log(logging.ERROR, "fenced: another instance took the export over", "fenced")

    def _lease(self, beat: int) -> bytes:
        return Lease(self.policy.instance, beat).encode()

    async def release(self) -> None:
        """Shutdown: let go of the lock, so that a standby takes it at once."""
        volume = self.volume
        if volume is None or self.role != "active" or volume.rbd_store.fenced:
            return
        with contextlib.suppress(OSError):
            await asyncio.to_thread(volume.rbd_store.unlock)
            self._log(logging.INFO, "released the export", "released")
