"""netblk.ko's control files, ``<root>/netblkN/*`` (kmod/README.md is the contract).

Paths are built only from a device name that matches ``DEVICE_RE`` and names
an existing directory, and from the attribute names below: never from request
data as such.  Everything here blocks; the app calls it on worker threads.
"""

from __future__ import annotations

import enum
import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: netblk.ko's device names, netblkN; N is at most 3 digits (the driver has
#: at most 16), so a name is never too long to look up as a file.
DEVICE_RE = re.compile(r"netblk(?:0|[1-9][0-9]{0,2})")
DEVICE_PREFIX = "netblk"


class State(enum.StrEnum):
    """The driver's ``state`` values."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ERROR = "error"


#: Where the driver takes ``connect`` and changes of the target attributes.
IDLE = frozenset({State.DISCONNECTED, State.ERROR})
#: States the driver leaves by itself; a wait goes on through them.
TRANSIENT = frozenset({State.CONNECTING, State.HANDSHAKING, State.RECONNECTING})

#: Where to connect: -EBUSY unless the state is in IDLE.  ``servers`` is the
#: server list; ``server_ip`` its first address (a write makes it the only one).
TARGET_ATTRS = ("servers", "server_ip", "server_port", "export")
#: Failure handling: writable in any state.
TUNABLE_ATTRS = ("request_timeout_ms", "dead_timeout_ms", "reconnect_retries")
CONFIG_ATTRS = TARGET_ATTRS + TUNABLE_ATTRS
ACTIONS = ("connect", "disconnect")
WRITABLE = frozenset(CONFIG_ATTRS + ACTIONS)


class DeviceNotFound(LookupError):
    """No such netblk device (or it went away: the module was unloaded)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class SysfsError(Exception):
    """A read or write of a control file failed; ``errno`` says why.

    For writes this is how the driver refuses a value (kmod/README.md):
    EINVAL, EBUSY, EDESTADDRREQ, ENODEV.
    """

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"{path}: {exc.strerror}")
        self.errno = exc.errno or errno.EIO
        self.attr = path.name
        self.strerror = exc.strerror or os.strerror(self.errno)


@dataclass(frozen=True)
class Snapshot:
    """One device as read file by file (not atomic: the driver may move on)."""

    name: str
    state: State
    last_error: str
    #: The server connected to or being tried; empty when idle.
    current_server: str
    config: Mapping[str, str]
    stats: Mapping[str, int]


def write_attribute(path: Path, data: bytes) -> None:
    """Store ``data`` with one write(), as the driver parses each store whole.

    No O_CREAT: a missing file is an error, not a new file.  (The host
    tests' fake driver stands in here.)
    """
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def parse_stats(text: str) -> dict[str, int]:
    """The driver's ``key: value`` lines as a dict; anything else is a ValueError."""
    stats = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"unexpected line in netblk stats: {line!r}")
        stats[key.strip()] = int(value)
    return stats


class DeviceTree:
    """The netblk devices under a sysfs block directory (``/sys/block``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        """netblk devices in index order; SysfsError if the root is unreadable."""
        try:
            entries = os.listdir(self.root)
        except OSError as exc:
            raise SysfsError(self.root, exc) from None
        devices = (name for name in entries if DEVICE_RE.fullmatch(name))
        return sorted(devices, key=lambda name: int(name.removeprefix(DEVICE_PREFIX)))

    def read(self, name: str, attr: str) -> str:
        return self._read(self._device_dir(name), attr)

    def state(self, name: str) -> State:
        return State(self.read(name, "state"))

    def snapshot(self, name: str) -> Snapshot:
        directory = self._device_dir(name)
        return Snapshot(
            name=name,
            state=State(self._read(directory, "state")),
            last_error=self._read(directory, "last_error"),
            current_server=self._read(directory, "current_server"),
            config={attr: self._read(directory, attr) for attr in CONFIG_ATTRS},
            stats=parse_stats(self._read(directory, "stats")),
        )

    def write(self, name: str, attr: str, value: str) -> None:
        if attr not in WRITABLE:
            raise ValueError(f"{attr!r} is not a writable netblk attribute")
        directory = self._device_dir(name)
        try:
            write_attribute(directory / attr, f"{value}\n".encode())
        except OSError as exc:
            raise self._failure(directory, attr, exc) from None

    def _device_dir(self, name: str) -> Path:
        if not DEVICE_RE.fullmatch(name):
            raise DeviceNotFound(name)
        directory = self.root / name
        if not directory.is_dir():
            raise DeviceNotFound(name)
        return directory

    def _read(self, directory: Path, attr: str) -> str:
        try:
            # The driver prints reasons as ASCII ('?' for the rest); be lenient anyway.
            text = (directory / attr).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise self._failure(directory, attr, exc) from None
        return text.removesuffix("\n")

    @staticmethod
    def _failure(directory: Path, attr: str, exc: OSError) -> Exception:
        # The whole directory disappears when the module is unloaded.
        if exc.errno == errno.ENOENT and not directory.is_dir():
            return DeviceNotFound(directory.name)
        return SysfsError(directory / attr, exc)
