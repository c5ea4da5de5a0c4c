"""A stand-in for netblk.ko under a temporary sysfs root.

Every attribute is a plain file that reads like the real one.  Stores go
through ``netblk_admin.sysfs.write_attribute``, which ``install`` wraps with
the driver's store rules, written here from kmod/README.md rather than taken
from the API's own code (the ranges, defaults and stats keys come from the
UAPI header's mirror, as the driver's do): EINVAL for bad values, EBUSY for a change of
target or a connect unless disconnected or in error, EDESTADDRREQ for a
connect without a server or export.  ``server_ip`` and ``servers`` are two
views of one list, and ``current_server`` is the list's first entry while a
connect is under way or done.  A store the driver would take is then
written by the real function.  As in the driver, ``connect`` is
``connecting`` by the time the write returns and ``disconnect`` is done by
then; timer threads move a connect on to ``handshaking`` and to
``connected``, ``error`` or nowhere (``hang``), ``step`` seconds apart.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from netblk.protocol.constants import DEFAULT_PORT, SYSFS_RANGES, SYSFS_STATS
from netblk_admin import sysfs

DEFAULTS = {
    "servers": "",
    "server_ip": "",
    "server_port": str(DEFAULT_PORT),
    "export": "",
    **{name: str(default) for name, (_low, _high, default) in SYSFS_RANGES.items()},
}
STATS_KEYS = SYSFS_STATS
RANGES = {
    "server_port": (1, 65535),
    **{name: (low, high) for name, (low, high, _default) in SYSFS_RANGES.items()},
}
EXPORT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
TARGET = ("servers", "server_ip", "server_port", "export")
MAX_SERVERS = 8
IDLE = ("disconnected", "error")
LOGIN_REFUSED = "login to export 'data' refused: NO_EXPORT: no such export"


class FakeDriver:
    def __init__(self, root: Path, devices: int = 2, step: float = 0.02) -> None:
        self.root = root
        self.step = step
        #: How a connect ends, per device: "connected", "error" or "hang".
        self.outcome = {f"netblk{i}": "connected" for i in range(devices)}
        #: Stores the driver took, and those it refused, in order.
        self.stores: list[tuple[str, str, str]] = []
        self.refused: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._attempt = dict.fromkeys(self.outcome, 0)
        self._real_write: Callable[[Path, bytes], None] = sysfs.write_attribute
        for name in self.outcome:
            directory = root / name
            directory.mkdir(parents=True)
            for attr, value in DEFAULTS.items():
                self.set(name, attr, value)
            self.set(name, "state", "disconnected")
            self.set(name, "last_error", "")
            self.set(name, "current_server", "")
            self.set_stats(name, **dict.fromkeys(STATS_KEYS, 0))
            for attr in ("connect", "disconnect"):
                (directory / attr).touch(mode=0o200)
        # What else lives in /sys/block: never listed, never reachable.
        (root / "sda").mkdir()
        (root / "loop0").mkdir()
        (root / "netblk").mkdir()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(sysfs, "write_attribute", self._store)

    def close(self) -> None:
        """Strand pending timers: they check the attempt number first."""
        with self._lock:
            for name in self._attempt:
                self._attempt[name] += 1

    def read(self, name: str, attr: str) -> str:
        return (self.root / name / attr).read_text().removesuffix("\n")

    def state(self, name: str) -> str:
        return self.read(name, "state")

    def set(self, name: str, attr: str, value: str) -> None:
        """Replace a file whole, so a concurrent reader sees old or new."""
        path = self.root / name / attr
        temporary = path.with_name(f".{attr}.new")
        temporary.write_text(f"{value}\n")
        os.replace(temporary, path)

    def set_stats(self, name: str, **values: int) -> None:
        self.set(name, "stats", "\n".join(f"{key}: {value}" for key, value in values.items()))

    def files(self) -> dict[str, str]:
        """Every attribute's content, to prove a refused request wrote nothing."""
        return {
            f"{name}/{path.name}": path.read_text()
            for name in self.outcome
            for path in sorted((self.root / name).iterdir())
        }

    def _store(self, path: Path, data: bytes) -> None:
        name, attr = path.parent.name, path.name
        value = data.decode().removesuffix("\n")
        with self._lock:
            code = self._refusal(name, attr, value)
            if code:
                self.refused.append((name, attr, code))
                raise OSError(code, os.strerror(code))
            self._real_write(path, data)
            self.stores.append((name, attr, value))
            if attr == "server_ip":
                self.set(name, "servers", value)
            elif attr == "servers":
                self.set(name, "servers", " ".join(value.split()))
                self.set(name, "server_ip", _address(value.split()[0]))
            elif attr == "connect":
                self._attempt[name] += 1
                self.set(name, "last_error", "")
                self._advance(name, self._attempt[name], "connecting")
            elif attr == "disconnect":
                self._attempt[name] += 1
                self.set(name, "state", "disconnected")
                self.set(name, "current_server", "")

    def _refusal(self, name: str, attr: str, value: str) -> int:
        if not _valid(attr, value):
            return errno.EINVAL
        state = self.state(name)
        if (attr in TARGET or attr == "connect") and state not in IDLE:
            return errno.EBUSY
        if attr == "connect" and not (self.read(name, "servers") and self.read(name, "export")):
            return errno.EDESTADDRREQ
        return 0

    def _advance(self, name: str, attempt: int, state: str) -> None:
        """Enter ``state`` and schedule the next; called with the lock held."""
        if attempt != self._attempt[name]:
            return  # disconnected or reconnected since
        if state == "error":  # the reason first, as netblk.ko sets it
            self.set(name, "last_error", LOGIN_REFUSED)
        self.set(name, "state", state)
        first = self.read(name, "servers").split()[0]
        current = "" if state in IDLE else _with_port(first, self.read(name, "server_port"))
        self.set(name, "current_server", current)
        outcome = self.outcome[name]
        if state == "connecting":
            following = "handshaking"
        elif state == "handshaking" and outcome != "hang":
            following = outcome
        else:
            return
        if self.step == 0:
            self._advance(name, attempt, following)
        else:
            timer = threading.Timer(self.step, self._advance_locked, (name, attempt, following))
            timer.daemon = True
            timer.start()

    def _advance_locked(self, name: str, attempt: int, state: str) -> None:
        with self._lock:
            self._advance(name, attempt, state)


def _split_entry(entry: str) -> tuple[str, str | None]:
    """A server list entry's address and port (None: server_port's), in
    kmod/README.md's forms ADDR4, ADDR4:PORT, ADDR6, [ADDR6], [ADDR6]:PORT."""
    if entry.startswith("["):
        address, _, rest = entry[1:].partition("]")
        return address, rest.removeprefix(":") if rest else None
    if entry.count(":") == 1:
        address, port = entry.split(":")
        return address, port
    return entry, None


def _address(entry: str) -> str:
    return _split_entry(entry)[0]


def _with_port(entry: str, default_port: str) -> str:
    address, port = _split_entry(entry)
    port = port or default_port
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _valid_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return "%" not in value


def _valid_entry(entry: str) -> bool:
    address, port = _split_entry(entry)
    if not _valid_ip(address):
        return False
    if entry.startswith("[") and (":" not in address or "]" not in entry):
        return False  # brackets hold an IPv6 address
    return port is None or (port.isdigit() and 1 <= int(port) <= 65535)


def _valid(attr: str, value: str) -> bool:
    if attr in ("connect", "disconnect"):
        return value == "1"
    if attr == "server_ip":
        return _valid_ip(value)
    if attr == "servers":
        entries = value.replace(",", " ").split()
        return (
            0 < len(entries) <= MAX_SERVERS
            and len(set(entries)) == len(entries)
            and all(map(_valid_entry, entries))
        )
    if attr == "export":
        return EXPORT_RE.fullmatch(value) is not None
    low, high = RANGES[attr]
    return value.isdigit() and low <= int(value) <= high
