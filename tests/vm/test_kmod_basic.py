"""netblk.ko basics, in the guest as root.

Loading and unloading (also in the middle of a handshake), module
parameters, the devices and every sysfs attribute with its validation, and
the generic-netlink handshake upcall driven by a tiny raw-netlink client
standing in for tls-bridge: READY, ACCEPT (fd installed in this process),
DONE with a failure, a wrong cookie, a wrong fd, a success without kTLS,
and the handshake deadline.  Nothing here needs storaged or tls-bridge.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import random
import re
import select
import socket
import stat
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netblk.protocol.constants import (
    GENL_MCGRP_HANDSHAKE,
    GENL_NAME,
    SYSFS_STATES,
    SYSFS_STATS,
    GenlAttr,
    GenlCmd,
)
from tests.vm.module import KO, SYS_MODULE, insmod, loaded, rmmod

STATES = set(SYSFS_STATES)
STATS_KEYS = list(SYSFS_STATS)
WRITABLE = [
    "servers",
    "server_ip",
    "server_port",
    "export",
    "request_timeout_ms",
    "dead_timeout_ms",
    "reconnect_retries",
]
READABLE = [*WRITABLE, "state", "last_error", "stats", "connections", "current_server"]

# --- the netlink contract: the drift-tested mirror of the UAPI header -----------

A_DEVICE = GenlAttr.DEVICE
A_SOCKFD = GenlAttr.SOCKFD
A_COOKIE = GenlAttr.COOKIE
A_PEER_ADDR = GenlAttr.PEER_ADDR
A_PEER_PORT = GenlAttr.PEER_PORT
A_EXPORT = GenlAttr.EXPORT
A_TIMEOUT_MS = GenlAttr.TIMEOUT_MS
A_STATUS = GenlAttr.STATUS
A_REASON = GenlAttr.REASON
A_EXPORT_SIZE = GenlAttr.EXPORT_SIZE
A_EXPORT_FLAGS = GenlAttr.EXPORT_FLAGS
A_MAX_PAYLOAD = GenlAttr.MAX_PAYLOAD
A_MAX_INFLIGHT = GenlAttr.MAX_INFLIGHT

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1


def nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def nla_u16(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=H", value))


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def nla_s32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=i", value))


def nla_u64(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=Q", value))


def nla_str(kind: int, value: str) -> bytes:
    return nla(kind, value.encode() + b"\0")


def parse_attrs(data: bytes) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while len(data) >= 4:
        size, kind = struct.unpack_from("=HH", data)
        if size < 4:
            break
        attrs[kind & 0x3FFF] = data[4:size]
        data = data[(size + 3) & ~3 :]
    return attrs


def as_u32(raw: bytes) -> int:
    return int(struct.unpack("=I", raw)[0])


def as_s32(raw: bytes) -> int:
    return int(struct.unpack("=i", raw)[0])


def as_u16(raw: bytes) -> int:
    return int(struct.unpack("=H", raw)[0])


def as_u64(raw: bytes) -> int:
    return int(struct.unpack("=Q", raw)[0])


def as_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


class Genl:
    """A minimal generic netlink client: enough to stand in for tls-bridge."""

    def __init__(self, name: str = GENL_NAME) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.sock.settimeout(10)
        self.seq = 0
        reply = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, nla_str(CTRL_ATTR_FAMILY_NAME, name))
        attrs = reply[0]
        self.family = as_u16(attrs[CTRL_ATTR_FAMILY_ID])
        self.groups: dict[str, int] = {}
        for raw in parse_attrs(attrs[CTRL_ATTR_MCAST_GROUPS]).values():
            grp = parse_attrs(raw)
            self.groups[as_str(grp[CTRL_ATTR_MCAST_GRP_NAME])] = as_u32(grp[CTRL_ATTR_MCAST_GRP_ID])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Genl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, family: int, cmd: int, attrs: bytes = b"", version: int = 1
    ) -> list[dict[int, bytes]]:
        """Send one request with NLM_F_ACK; return the replies, raise OSError on error."""
        self.seq += 1
        body = struct.pack("=BBH", cmd, version, 0) + attrs
        self.sock.send(
            struct.pack("=IHHII", 16 + len(body), family, NLM_F_REQUEST | NLM_F_ACK, self.seq, 0)
            + body
        )
        replies: list[dict[int, bytes]] = []
        while True:
            data = self.sock.recv(65536)
            while len(data) >= 16:
                size, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data)
                msg, data = data[16:size], data[(size + 3) & ~3 :]
                if seq != self.seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", msg)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return replies
                if kind == NLMSG_DONE:
                    return replies
                replies.append(parse_attrs(msg[4:]))

    def join(self, group: str = GENL_MCGRP_HANDSHAKE) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, self.groups[group])

    def next_event(self, timeout: float = 10) -> tuple[int, dict[int, bytes]]:
        """The next multicast message: (cmd, attrs)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no multicast message arrived"
        data = self.sock.recv(65536)
        size = struct.unpack_from("=I", data)[0]
        return data[16], parse_attrs(data[20:size])

    def accept(self) -> Accepted:
        attrs = self.request(self.family, GenlCmd.ACCEPT)[0]
        return Accepted(
            device=as_u32(attrs[A_DEVICE]),
            fd=as_s32(attrs[A_SOCKFD]),
            cookie=as_u64(attrs[A_COOKIE]),
            peer=as_str(attrs[A_PEER_ADDR]),
            port=as_u16(attrs[A_PEER_PORT]),
            export=as_str(attrs[A_EXPORT]),
            timeout_ms=as_u32(attrs[A_TIMEOUT_MS]),
        )

    def done(self, *attrs: bytes) -> None:
        self.request(self.family, GenlCmd.DONE, b"".join(attrs))

    def done_failed(self, accepted: Accepted, status: int, reason: str) -> None:
        self.done(
            nla_u64(A_COOKIE, accepted.cookie),
            nla_s32(A_SOCKFD, accepted.fd),
            nla_u32(A_STATUS, status),
            nla_str(A_REASON, reason),
        )

    def done_ok(self, accepted: Accepted, size: int = 64 << 20, flags: int = 0x1E) -> None:
        self.done(
            nla_u64(A_COOKIE, accepted.cookie),
            nla_s32(A_SOCKFD, accepted.fd),
            nla_u32(A_STATUS, 0),
            nla_u64(A_EXPORT_SIZE, size),
            nla_u32(A_EXPORT_FLAGS, flags),
            nla_u32(A_MAX_PAYLOAD, 1 << 20),
            nla_u32(A_MAX_INFLIGHT, 64),
        )


@dataclass
class Accepted:
    device: int
    fd: int
    cookie: int
    peer: str
    port: int
    export: str
    timeout_ms: int


# --- module and sysfs helpers ------------------------------------------------------


@contextlib.contextmanager
def netblk_module(**params: object) -> Iterator[None]:
    assert not loaded(), "netblk is already loaded"
    insmod(**params)
    try:
        yield
    finally:
        if loaded():
            rmmod()


def path(dev: str, name: str) -> Path:
    return Path("/sys/block") / dev / name


def read(dev: str, name: str) -> str:
    return path(dev, name).read_text().removesuffix("\n")


def write(dev: str, name: str, value: str | bytes) -> None:
    data = value.encode() if isinstance(value, str) else value
    fd = os.open(path(dev, name), os.O_WRONLY)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def write_error(dev: str, name: str, value: str | bytes) -> int:
    """Write and return the errno (the write must fail)."""
    with pytest.raises(OSError) as err:
        write(dev, name, value)
    return err.value.errno or 0


def snapshot(dev: str) -> dict[str, str]:
    return {name: read(dev, name) for name in READABLE}


def stats(dev: str) -> dict[str, int]:
    lines = read(dev, "stats").splitlines()
    assert [line.split(":")[0] for line in lines] == STATS_KEYS
    return {key: int(value) for key, value in (line.split(": ") for line in lines)}


def wait_for(predicate: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def wait_state(dev: str, *states: str, timeout: float = 20) -> str:
    wait_for(lambda: read(dev, "state") in states, timeout, f"{dev} state in {states}")
    return read(dev, "state")


@contextlib.contextmanager
def listener(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        sock.listen(8)
        sock.settimeout(10)
        yield sock


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose SYNs are dropped: a listener with a full accept queue."""
    with socket.socket() as srv, socket.socket() as filler:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        filler.connect(srv.getsockname())
        yield srv.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def configure(dev: str, ip: str, port: int, export: str = "vol1") -> None:
    write(dev, "server_ip", ip)
    write(dev, "server_port", str(port))
    write(dev, "export", export)


def start_handshake(helper: Genl, dev: str, srv: socket.socket) -> Accepted:
    """Point ``dev`` at ``srv``, connect, and ACCEPT the READY it posts."""
    helper.join()
    configure(dev, "127.0.0.1", srv.getsockname()[1])
    write(dev, "connect", "1")
    helper.next_event()
    return helper.accept()


def disconnect(dev: str) -> None:
    write(dev, "disconnect", "1")
    assert read(dev, "state") == "disconnected"


@contextlib.contextmanager
def param(name: str, value: str) -> Iterator[None]:
    file = SYS_MODULE / "parameters" / name
    old = file.read_text().strip()
    file.write_text(value)
    try:
        yield
    finally:
        file.write_text(old)


# --- without the shared module: loading, parameters, unload in any state ---------


@pytest.fixture
def unloaded() -> Iterator[None]:
    assert not loaded(), "netblk must not be loaded for this test"
    yield
    if loaded():
        rmmod()


def test_modinfo_documents_parameters() -> None:
    out = subprocess.run(
        ["modinfo", "-F", "parm", str(KO)], check=True, capture_output=True, text=True
    ).stdout
    params = {line.split(":", 1)[0]: line for line in out.splitlines()}
    assert set(params) == {
        "nr_devices",
        "queue_depth",
        "handshake_timeout_ms",
        "connect_timeout_ms",
        "connections",
    }
    assert "default 1" in params["nr_devices"]
    assert "one per online CPU" in params["connections"]
    assert "default 64" in params["queue_depth"]
    info = subprocess.run(["modinfo", str(KO)], check=True, capture_output=True, text=True).stdout
    assert "license:        GPL" in info
    assert "net-pf-16-proto-16-family-netblk" in info


@pytest.mark.usefixtures("unloaded")
def test_load_unload_50_cycles() -> None:
    for cycle in range(50):
        insmod(nr_devices=2)
        assert Path("/sys/block/netblk0").is_dir(), cycle
        assert Path("/sys/block/netblk1").is_dir(), cycle
        rmmod()
        assert not loaded(), cycle
        assert not Path("/sys/block/netblk0").exists(), cycle


@pytest.mark.usefixtures("unloaded")
def test_parameters_visible_and_applied() -> None:
    with netblk_module(nr_devices=3, queue_depth=32, handshake_timeout_ms=5000, connections=1):
        params = SYS_MODULE / "parameters"
        assert (params / "nr_devices").read_text() == "3\n"
        assert (params / "queue_depth").read_text() == "32\n"
        # One hardware queue per connection.
        assert (params / "connections").read_text() == "1\n"
        assert len(list(Path("/sys/block/netblk2/mq").iterdir())) == 1
        assert (params / "handshake_timeout_ms").read_text() == "5000\n"
        assert (params / "connect_timeout_ms").read_text() == "10000\n"
        assert [p.name for p in sorted(Path("/sys/block").glob("netblk*"))] == [
            "netblk0",
            "netblk1",
            "netblk2",
        ]
        write("netblk2", "queue/scheduler", "none")
        assert read("netblk2", "queue/nr_requests") == "32"
        # Read-only at runtime: mode 0444.
        assert stat.S_IMODE((params / "nr_devices").stat().st_mode) == 0o444
        # Runtime-tunable timeouts are validated.
        for bad in ["5", "600001", "abc", "", "-1"]:
            with pytest.raises(OSError) as err:
                (params / "handshake_timeout_ms").write_text(bad + "\n")
            assert err.value.errno == errno.EINVAL, bad
        (params / "handshake_timeout_ms").write_text("7000\n")
        assert (params / "handshake_timeout_ms").read_text() == "7000\n"


@pytest.mark.usefixtures("unloaded")
@pytest.mark.parametrize("params", [{}, {"connections": 0}, {"connections": 16}])
def test_connections_are_one_per_cpu_at_most(params: dict[str, int]) -> None:
    """The default, and the cap: a hardware queue no CPU maps to would idle."""
    cpus = min(os.cpu_count() or 1, 16)
    with netblk_module(**params):
        assert (SYS_MODULE / "parameters" / "connections").read_text() == f"{cpus}\n"
        assert len(list(Path("/sys/block/netblk0/mq").iterdir())) == cpus


@pytest.mark.usefixtures("unloaded")
@pytest.mark.parametrize(
    "params",
    [
        {"nr_devices": 0},
        {"nr_devices": 17},
        {"queue_depth": 0},
        {"queue_depth": 1025},
        {"connections": 17},
        {"handshake_timeout_ms": 5},
        {"connect_timeout_ms": 9999999},
    ],
)
def test_bad_parameters_refuse_to_load(params: dict[str, int]) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        insmod(**params)
    assert not loaded()
    assert not Path("/sys/block/netblk0").exists()


@pytest.mark.usefixtures("unloaded")
def test_rmmod_with_unaccepted_handshake() -> None:
    """A handshake no helper ever accepts does not block unloading."""
    with netblk_module(), listener() as srv, Genl() as helper:
        helper.join()
        configure("netblk0", "127.0.0.1", srv.getsockname()[1])
        write("netblk0", "connect", "1")
        assert wait_state("netblk0", "handshaking", "error") == "handshaking"
        conn, _ = srv.accept()
        with conn:
            start = time.monotonic()
            rmmod()
            assert time.monotonic() - start < 10
            assert not loaded()
            conn.settimeout(10)
            assert conn.recv(1) == b"", "the driver's socket must be closed"


@pytest.mark.usefixtures("unloaded")
def test_rmmod_while_helper_holds_the_fd() -> None:
    with netblk_module(), listener() as srv, Genl() as helper:
        helper.join()
        configure("netblk0", "127.0.0.1", srv.getsockname()[1])
        write("netblk0", "connect", "1")
        wait_state("netblk0", "handshaking")
        conn, _ = srv.accept()
        accepted = helper.accept()
        try:
            rmmod()
            assert not loaded()
            # Our fd still names a working socket; the driver shut it down.
            sock = socket.socket(fileno=os.dup(accepted.fd))
            with sock, conn:
                assert sock.getpeername()[1] == srv.getsockname()[1]
                conn.settimeout(10)
                assert conn.recv(1) == b""
        finally:
            os.close(accepted.fd)


@pytest.mark.usefixtures("unloaded")
def test_rmmod_in_error_and_connecting_states() -> None:
    with netblk_module():
        configure("netblk0", "127.0.0.1", free_port())
        write("netblk0", "connect", "1")
        wait_state("netblk0", "error")
        rmmod()
    # A connect that hangs (its SYNs are dropped) is aborted by rmmod.
    with netblk_module(connect_timeout_ms=60000), blackhole() as port:
        configure("netblk0", "127.0.0.1", port)
        write("netblk0", "connect", "1")
        time.sleep(0.5)
        assert read("netblk0", "state") == "connecting"
        start = time.monotonic()
        rmmod()
        assert time.monotonic() - start < 10


# --- with the shared module (nr_devices=2) ---------------------------------------


@pytest.fixture(scope="module")
def netblk() -> Iterator[None]:
    """One connection per device: the hand-driven handshakes here answer one
    READY per connect (sets of connections: test_kmod_sets.py)."""
    if loaded():
        rmmod()
    with netblk_module(nr_devices=2, connections=1):
        yield


@pytest.fixture
def dev0(netblk: None) -> Iterator[str]:
    """netblk0, disconnected before and after the test."""
    assert read("netblk0", "state") in {"disconnected", "error"}
    yield "netblk0"
    disconnect("netblk0")


def test_devices_appear_with_capacity_zero(netblk: None) -> None:
    major = next(
        int(line.split()[0])
        for line in Path("/proc/devices").read_text().splitlines()
        if line.endswith(" netblk")
    )
    for index in (0, 1):
        dev = f"netblk{index}"
        node = os.stat(f"/dev/{dev}")
        assert stat.S_ISBLK(node.st_mode)
        assert os.major(node.st_rdev) == major
        assert read(dev, "size") == "0"
        assert read(dev, "queue/logical_block_size") == "4096"
        assert read(dev, "queue/physical_block_size") == "4096"
        assert read(dev, "state") == "disconnected"
        assert read(dev, "last_error") == ""
        assert stats(dev) == dict.fromkeys(STATS_KEYS, 0)
    assert not Path("/sys/block/netblk2").exists()
    # Reading an empty device gives nothing, not an error or a hang.
    with open("/dev/netblk0", "rb") as disk:
        assert disk.read(4096) == b""


def test_defaults(netblk: None) -> None:
    assert snapshot("netblk1") == {
        "servers": "",
        "server_ip": "",
        "server_port": "10910",
        "export": "",
        "request_timeout_ms": "30000",
        "dead_timeout_ms": "30000",
        "reconnect_retries": "100",
        "state": "disconnected",
        "last_error": "",
        "stats": read("netblk1", "stats"),
        "connections": "0",
        "current_server": "",
    }


def test_connect_needs_server_and_export(netblk: None) -> None:
    before = snapshot("netblk1")
    assert write_error("netblk1", "connect", "1") == errno.EDESTADDRREQ
    assert snapshot("netblk1") == before


def test_attribute_modes(netblk: None) -> None:
    modes = {
        name: stat.S_IMODE(path("netblk0", name).stat().st_mode)
        for name in [*READABLE, "connect", "disconnect"]
    }
    assert modes == {
        **dict.fromkeys(WRITABLE, 0o644),
        "state": 0o444,
        "last_error": 0o444,
        "stats": 0o444,
        "connections": 0o444,
        "current_server": 0o444,
        "connect": 0o200,
        "disconnect": 0o200,
    }
    for name in ["state", "last_error", "stats", "connections", "current_server"]:
        with pytest.raises(PermissionError):
            write("netblk0", name, "x")


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("server_ip", "192.0.2.7", "192.0.2.7"),
        ("server_ip", "192.0.2.8\n", "192.0.2.8"),
        ("server_ip", "0.0.0.0", "0.0.0.0"),
        ("server_ip", "2001:db8::1", "2001:db8::1"),
        ("server_ip", "2001:0db8:0000:0000:0000:0000:0000:0002", "2001:db8::2"),
        ("server_ip", "::1", "::1"),
        ("servers", "192.0.2.7", "192.0.2.7"),
        ("servers", "192.0.2.7:80\n", "192.0.2.7:80"),
        ("servers", "192.0.2.7:080", "192.0.2.7:80"),
        ("servers", "[2001:db8::1]:65535", "[2001:db8::1]:65535"),
        ("servers", "[2001:0db8::0001]", "2001:db8::1"),
        ("servers", "2001:db8::1", "2001:db8::1"),
        ("servers", "::1:80", "::1:80"),  # an IPv6 address; a port needs brackets
        ("servers", "192.0.2.1 192.0.2.1:80", "192.0.2.1 192.0.2.1:80"),
        ("servers", " 192.0.2.1,192.0.2.2 ,, [::1]:9 ", "192.0.2.1 192.0.2.2 [::1]:9"),
        (
            "servers",
            " ".join(f"192.0.2.{i}" for i in range(8)),
            " ".join(f"192.0.2.{i}" for i in range(8)),
        ),
        ("server_port", "1", "1"),
        ("server_port", "65535\n", "65535"),
        ("export", "a", "a"),
        ("export", "vol-1.x_Y", "vol-1.x_Y"),
        ("export", "0" + "x" * 63, "0" + "x" * 63),
        ("export", "_x\n", "_x"),
        ("request_timeout_ms", "100", "100"),
        ("request_timeout_ms", "3600000", "3600000"),
        ("dead_timeout_ms", "0", "0"),
        ("dead_timeout_ms", "86400000", "86400000"),
        ("reconnect_retries", "0", "0"),
        ("reconnect_retries", "1000000", "1000000"),
    ],
)
def test_valid_values_are_taken(netblk: None, name: str, value: str, shown: str) -> None:
    before = snapshot("netblk0")
    write("netblk1", name, value)
    assert read("netblk1", name) == shown
    assert snapshot("netblk0") == before, "the other device changed"


GARBAGE: dict[str, list[str | bytes]] = {
    "servers": [
        "\n",
        " ",
        ",",
        " , \n",
        " ".join(f"192.0.2.{i}" for i in range(9)),
        "192.0.2.1 192.0.2.1",
        "192.0.2.1:80,192.0.2.1:80",
        "2001:db8::1 2001:DB8:0::1",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "192.0.2.1:",
        "192.0.2.1:+80",
        "192.0.2.1:8x",
        "192.0.2.1:80:81",
        "[192.0.2.1]:80",
        "[::1",
        "[::1]80",
        "[::1]:",
        "[[::1]]:80",
        "localhost:80",
        "192.0.2.1\t192.0.2.2",
        "192.0.2.1\n192.0.2.2",
        "fe80::1%eth0",
        b"192.0.2.1\0",
        "x" * 100,
    ],
    "server_ip": [
        "\n",
        "1.2.3",
        "1.2.3.4.5",
        "256.1.1.1",
        "1.2.3.4 ",
        " 1.2.3.4",
        "1.2.3.4x",
        "1.2.3.4\n\n",
        "1.2.3.4/24",
        "abc",
        "localhost",
        "::g",
        "1::2::3",
        "fe80::1%eth0",
        "[::1]",
        "1.2.3.4:80",
        b"1.2.3.4\0",
        "x" * 100,
    ],
    "server_port": [
        "\n",
        "0",
        "65536",
        "70000",
        "abc",
        "-1",
        "1 2",
        "12abc",
        "0x10",
        " 80",
        "8\n0",
    ],
    "export": [
        "\n",
        "../x",
        ".x",
        "-x",
        "a/b",
        "a b",
        "a\n\n",
        "x" * 65,
        "é",
        b"a\0b",
        "a\tb",
        "vol*",
    ],
    "request_timeout_ms": [
        "\n",
        "abc",
        "-1",
        "99",
        "0",
        "3600001",
        "4294967296",
        "1.5",
        "10 ",
        "1e3",
    ],
    "dead_timeout_ms": ["\n", "abc", "-1", "86400001", "4294967296", "1,5", "0x10"],
    "reconnect_retries": ["\n", "abc", "-1", "1000001", "99999999999", "5 5"],
    "connect": ["\n", "0", "2", "11", "yes", "true", "1 1", " 1"],
    "disconnect": ["\n", "0", "2", "yes", "1x"],
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_is_rejected_and_changes_nothing(netblk: None, name: str) -> None:
    write("netblk0", "server_ip", "192.0.2.1")
    write("netblk0", "export", "base")
    before = {dev: snapshot(dev) for dev in ("netblk0", "netblk1")}
    for value in GARBAGE[name]:
        assert write_error("netblk0", name, value) == errno.EINVAL, repr(value)
        assert {dev: snapshot(dev) for dev in ("netblk0", "netblk1")} == before, repr(value)


def test_server_ip_is_the_first_server_and_sets_a_list_of_one(netblk: None) -> None:
    write("netblk0", "servers", "192.0.2.1:81 [2001:db8::1]:82 192.0.2.3")
    assert read("netblk0", "server_ip") == "192.0.2.1"
    write("netblk0", "server_ip", "2001:db8::9")
    assert read("netblk0", "servers") == "2001:db8::9"
    # server_port is the port of the entries that name none
    write("netblk0", "server_port", "10999")
    assert read("netblk0", "servers") == "2001:db8::9"
    assert read("netblk0", "server_port") == "10999"


def test_empty_write_changes_nothing(netblk: None) -> None:
    before = snapshot("netblk0")
    for name in [*WRITABLE, "connect", "disconnect"]:
        write("netblk0", name, b"")
    assert snapshot("netblk0") == before


def test_connect_refused(dev0: str) -> None:
    configure(dev0, "127.0.0.1", free_port())
    write(dev0, "connect", "1")
    assert wait_state(dev0, "error") == "error"
    assert read(dev0, "last_error") == "connect: connection refused"
    assert read(dev0, "size") == "0"


def test_connect_refused_ipv6(dev0: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    configure(dev0, "::1", free_port())
    write(dev0, "connect", "1")
    assert wait_state(dev0, "error") == "error"
    assert read(dev0, "last_error") == "connect: connection refused"


def test_the_first_connect_tries_each_server_once(dev0: str) -> None:
    """Refused, refused, then one that answers (but with no tls-bridge)."""
    with listener() as srv:
        write(
            dev0,
            "servers",
            f"127.0.0.1:{free_port()} 127.0.0.1:{free_port()} 127.0.0.1:{srv.getsockname()[1]}",
        )
        write(dev0, "export", "vol1")
        write(dev0, "connect", "1")
        assert wait_state(dev0, "error") == "error"
        assert read(dev0, "last_error") == "no tls-bridge is listening"
        conn, _ = srv.accept()
        conn.close()
    assert read(dev0, "current_server") == ""
    # every one refused: the last one's reason
    write(dev0, "servers", f"127.0.0.1:{free_port()} 127.0.0.2:{free_port()}")
    write(dev0, "connect", "1")
    assert wait_state(dev0, "error") == "error"
    assert read(dev0, "last_error") == "connect: connection refused"


def test_connect_without_tls_bridge(dev0: str) -> None:
    with listener() as srv:
        configure(dev0, "127.0.0.1", srv.getsockname()[1])
        write(dev0, "connect", "1")
        assert wait_state(dev0, "error") == "error"
        assert read(dev0, "last_error") == "no tls-bridge is listening"
        # It did connect, then closed the socket.
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            assert conn.recv(1) == b""


def test_reconnect_after_error_clears_last_error(dev0: str) -> None:
    configure(dev0, "127.0.0.1", free_port())
    write(dev0, "connect", "1")
    wait_state(dev0, "error")
    with listener() as srv, Genl() as helper:
        helper.join()
        write(dev0, "server_port", str(srv.getsockname()[1]))
        write(dev0, "connect", "1")
        assert wait_state(dev0, "handshaking", "error") == "handshaking"
        assert read(dev0, "last_error") == ""


def test_accept_with_nothing_pending(netblk: None) -> None:
    with Genl() as helper:
        with pytest.raises(OSError) as err:
            helper.accept()
        assert err.value.errno == errno.ENOENT


def test_done_with_unknown_cookie_or_missing_attrs(netblk: None) -> None:
    with Genl() as helper:
        with pytest.raises(OSError) as err:
            helper.done(nla_u64(A_COOKIE, 12345), nla_u32(A_STATUS, 5))
        assert err.value.errno == errno.ENOENT
        with pytest.raises(OSError) as err:
            helper.done(nla_u32(A_STATUS, 5))
        assert err.value.errno == errno.EINVAL
        with pytest.raises(OSError) as err:
            helper.done(nla_u64(A_COOKIE, 1))
        assert err.value.errno == errno.EINVAL
        # STATUS is 0 or a positive errno: the policy refuses anything larger.
        with pytest.raises(OSError) as err:
            helper.done(nla_u64(A_COOKIE, 1), nla_u32(A_STATUS, 1 << 20))
        assert err.value.errno == errno.ERANGE
        # Over-long reason.
        with pytest.raises(OSError) as err:
            helper.done(nla_u64(A_COOKIE, 1), nla_u32(A_STATUS, 5), nla_str(A_REASON, "r" * 200))
        assert err.value.errno == errno.EINVAL


def test_netlink_ops_are_admin_only(netblk: None) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            with Genl() as helper:
                os.setgid(65534)
                os.setuid(65534)
                for call in (helper.accept, lambda: helper.done(nla_u64(A_COOKIE, 1))):
                    try:
                        call()
                    except PermissionError:
                        continue
                    os._exit(2)
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_handshake_upcall_failure(dev0: str) -> None:
    """READY, ACCEPT installs the socket in this process, DONE fails it."""
    with listener() as srv, Genl() as helper, Genl() as other:
        helper.join()
        port = srv.getsockname()[1]
        configure(dev0, "127.0.0.1", port, "vol.7")
        write(dev0, "connect", "1")

        cmd, attrs = helper.next_event()
        assert cmd == GenlCmd.READY
        assert as_u32(attrs[A_DEVICE]) == 0
        assert read(dev0, "state") == "handshaking"
        # Configuration is frozen while not disconnected.
        for name, value in [("server_ip", "192.0.2.9"), ("server_port", "1"), ("export", "x")]:
            assert write_error(dev0, name, value) == errno.EBUSY
        assert write_error(dev0, "connect", "1") == errno.EBUSY
        write(dev0, "request_timeout_ms", "30000")

        conn, peer = srv.accept()
        accepted = other.accept()
        try:
            assert accepted.device == 0
            assert accepted.peer == "127.0.0.1"
            assert accepted.port == port
            assert accepted.export == "vol.7"
            assert 0 < accepted.timeout_ms <= 30000
            assert accepted.cookie != 0
            assert fcntl.fcntl(accepted.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert stat.S_ISSOCK(os.fstat(accepted.fd).st_mode)
            sock = socket.socket(fileno=os.dup(accepted.fd))
            with sock:
                assert sock.getpeername() == ("127.0.0.1", port)
                assert sock.getsockname() == peer
                # The helper can talk through it before TLS.
                sock.sendall(b"ping")
                conn.settimeout(10)
                assert conn.recv(4) == b"ping"

            # Only one request was pending.
            with pytest.raises(OSError) as err:
                helper.accept()
            assert err.value.errno == errno.ENOENT
            # Wrong cookie, wrong fd, fd that is not open.
            with pytest.raises(OSError) as err:
                helper.done_failed(
                    Accepted(**{**accepted.__dict__, "cookie": accepted.cookie + 1}), 13, "x"
                )
            assert err.value.errno == errno.ENOENT
            with socket.socket() as stranger:
                with pytest.raises(OSError) as err:
                    helper.done_failed(
                        Accepted(**{**accepted.__dict__, "fd": stranger.fileno()}), 13, "x"
                    )
                assert err.value.errno == errno.EBADF
            with pytest.raises(OSError) as err:
                helper.done_failed(Accepted(**{**accepted.__dict__, "fd": 999}), 13, "x")
            assert err.value.errno == errno.EBADF
            assert read(dev0, "state") == "handshaking"

            helper.done_failed(accepted, errno.EACCES, "login refused: DENIED\n(bad token)")
            assert read(dev0, "state") == "error"
            assert read(dev0, "last_error") == "login refused: DENIED?(bad token)"
            assert read(dev0, "size") == "0"
            # The attempt is over: its cookie is gone, its socket shut down.
            with pytest.raises(OSError) as err:
                helper.done_failed(accepted, errno.EACCES, "again")
            assert err.value.errno == errno.ENOENT
            assert conn.recv(1) == b""
        finally:
            os.close(accepted.fd)
            conn.close()


def test_handshake_failure_without_reason(dev0: str) -> None:
    with listener() as srv, Genl() as helper:
        accepted = start_handshake(helper, dev0, srv)
        try:
            helper.done(nla_u64(A_COOKIE, accepted.cookie), nla_u32(A_STATUS, errno.EPROTO))
            assert read(dev0, "state") == "error"
            assert read(dev0, "last_error") == f"handshake failed (error {errno.EPROTO})"
        finally:
            os.close(accepted.fd)
            srv.accept()[0].close()


def test_done_success_without_ktls_is_refused(dev0: str) -> None:
    """The driver never sends block data in the clear."""
    with listener() as srv, Genl() as helper:
        accepted = start_handshake(helper, dev0, srv)
        conn, _ = srv.accept()
        try:
            # A success must carry the export's parameters.
            with pytest.raises(OSError) as err:
                helper.done(
                    nla_u64(A_COOKIE, accepted.cookie),
                    nla_s32(A_SOCKFD, accepted.fd),
                    nla_u32(A_STATUS, 0),
                )
            assert err.value.errno == errno.EINVAL
            assert read(dev0, "state") == "handshaking"
            with pytest.raises(OSError) as err:
                helper.done_ok(accepted)
            assert err.value.errno == errno.EPROTO
            assert read(dev0, "state") == "error"
            assert "kTLS is not active" in read(dev0, "last_error")
            assert read(dev0, "size") == "0"
            conn.settimeout(10)
            assert conn.recv(1) == b""
        finally:
            os.close(accepted.fd)
            conn.close()


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ((64 << 20) + 512, "is not a multiple of 4096"),
        # The block layer addresses an loff_t of bytes: 2^63 - 4096 at most.
        (2**63, "is beyond what the block layer addresses (9223372036854771712)"),
        (2**64 - 4096, "is beyond what the block layer addresses (9223372036854771712)"),
    ],
    ids=["unaligned", "2^63", "2^64-4096"],
)
def test_done_success_with_bad_parameters_is_refused(dev0: str, size: int, reason: str) -> None:
    with listener() as srv, Genl() as helper:
        accepted = start_handshake(helper, dev0, srv)
        try:
            with pytest.raises(OSError) as err:
                helper.done_ok(accepted, size=size)
            assert err.value.errno == errno.EINVAL
            assert read(dev0, "state") == "error"
            assert read(dev0, "last_error") == f"export size {size} {reason}"
        finally:
            os.close(accepted.fd)
            srv.accept()[0].close()


def test_handshake_deadline_unaccepted(dev0: str) -> None:
    with param("handshake_timeout_ms", "1000"), listener() as srv, Genl() as helper:
        helper.join()
        configure(dev0, "127.0.0.1", srv.getsockname()[1])
        write(dev0, "connect", "1")
        assert wait_state(dev0, "error", timeout=15) == "error"
        assert read(dev0, "last_error") == "handshake timed out (no tls-bridge accepted it)"
        with pytest.raises(OSError) as err:
            helper.accept()
        assert err.value.errno == errno.ENOENT
        srv.accept()[0].close()


def test_handshake_deadline_accepted(dev0: str) -> None:
    with param("handshake_timeout_ms", "1000"), listener() as srv, Genl() as helper:
        accepted = start_handshake(helper, dev0, srv)
        try:
            assert accepted.timeout_ms <= 1000
            assert wait_state(dev0, "error", timeout=15) == "error"
            assert read(dev0, "last_error") == "handshake timed out"
            with pytest.raises(OSError) as err:
                helper.done_ok(accepted)
            assert err.value.errno == errno.ENOENT
        finally:
            os.close(accepted.fd)
            srv.accept()[0].close()


def test_connect_timeout(dev0: str) -> None:
    with param("connect_timeout_ms", "500"), blackhole() as port:
        configure(dev0, "127.0.0.1", port)
        write(dev0, "connect", "1")
        assert read(dev0, "state") in {"connecting", "error"}
        assert wait_state(dev0, "error") == "error"
        assert read(dev0, "last_error") == "connect: timed out"


def test_disconnect_in_every_idle_or_pending_state(dev0: str) -> None:
    disconnect(dev0)  # disconnected -> disconnected
    with blackhole() as port:
        configure(dev0, "127.0.0.1", port)
        write(dev0, "connect", "1")
        time.sleep(0.3)
        assert read(dev0, "state") == "connecting"
        start = time.monotonic()
        disconnect(dev0)  # connecting -> disconnected, the connect aborted
        assert time.monotonic() - start < 5
    configure(dev0, "127.0.0.1", free_port())
    write(dev0, "connect", "1")
    wait_state(dev0, "error")
    disconnect(dev0)  # error -> disconnected
    with listener() as srv, Genl() as helper:
        helper.join()
        write(dev0, "server_port", str(srv.getsockname()[1]))
        write(dev0, "connect", "1")
        helper.next_event()
        disconnect(dev0)  # handshaking -> disconnected; the request is gone
        with pytest.raises(OSError) as err:
            helper.accept()
        assert err.value.errno == errno.ENOENT
        srv.accept()[0].close()
        # Accepted, then disconnected: DONE finds nothing.
        write(dev0, "connect", "1")
        helper.next_event()
        accepted = helper.accept()
        try:
            disconnect(dev0)
            with pytest.raises(OSError) as err:
                helper.done_failed(accepted, errno.EIO, "late")
            assert err.value.errno == errno.ENOENT
            assert read(dev0, "last_error") != "late"
        finally:
            os.close(accepted.fd)
            srv.accept()[0].close()


def test_two_devices_handshake_independently(netblk: None) -> None:
    with listener() as srv, Genl() as helper:
        helper.join()
        port = srv.getsockname()[1]
        configure("netblk0", "127.0.0.1", port, "zero")
        configure("netblk1", "127.0.0.1", port, "one")
        write("netblk0", "connect", "1")
        write("netblk1", "connect", "1")
        devices = {as_u32(helper.next_event()[1][A_DEVICE]) for _ in range(2)}
        assert devices == {0, 1}
        first, second = helper.accept(), helper.accept()
        try:
            assert {(first.device, first.export), (second.device, second.export)} == {
                (0, "zero"),
                (1, "one"),
            }
            one = first if first.device == 1 else second
            helper.done_failed(one, errno.ECONNRESET, "one failed")
            assert read("netblk1", "state") == "error"
            assert read("netblk1", "last_error") == "one failed"
            assert read("netblk0", "state") == "handshaking"
        finally:
            os.close(first.fd)
            os.close(second.fd)
            disconnect("netblk0")
            disconnect("netblk1")
            for _ in range(2):
                srv.accept()[0].close()


# --- I/O over kernel TLS, with a fake server and a fake tls-bridge ---------------
#
# No real TLS handshake: the fake bridge and the fake server install matching
# kTLS keys (AES-128-GCM, TLS 1.3, sequence 0) on their ends, which is exactly
# the state tls-bridge leaves the socket in.  This proves the driver's data
# path, reconnect and failure handling without storaged or tls-bridge.

SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TCP_ULP = 31
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51

REQUEST = struct.Struct(">IHHQQII")
REPLY = struct.Struct(">IIQ")
REQUEST_MAGIC = 0x4E424C51
REPLY_MAGIC = 0x4E424C52
OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_WRITE_ZEROES, OP_DISCONNECT = range(6)
FLAG_FUA, FLAG_NO_HOLE = 1, 2
EXPORT_READ_ONLY = 1 << 0
EXPORT_ALL = 0x1E  # SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES
EXPORT_SIZE = 32 << 20
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

KEYS = {
    direction: struct.pack(
        "=HH8s16s4s8s",
        TLS_1_3_VERSION,
        TLS_CIPHER_AES_GCM_128,
        os.urandom(8),
        os.urandom(16),
        os.urandom(4),
        b"\0" * 8,
    )
    for direction in ("c2s", "s2c")
}


def install_ktls(sock: socket.socket, tx: str, rx: str) -> None:
    sock.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
    sock.setsockopt(SOL_TLS, TLS_TX, KEYS[tx])
    sock.setsockopt(SOL_TLS, TLS_RX, KEYS[rx])


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        try:
            chunk = sock.recv(size - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


TLS_GET_RECORD_TYPE = 2
TLS_SET_RECORD_TYPE = 1
RECORD_ALERT = 21
RECORD_DATA = 23


def read_record(conn: socket.socket) -> tuple[int, bytes]:
    """The next TLS record's type and body (kTLS RX); (DATA, b"") at EOF."""
    try:
        body, ancillary, _, _ = conn.recvmsg(64, socket.CMSG_SPACE(1))
    except OSError:
        return RECORD_DATA, b""
    kinds = [
        data[0]
        for level, kind, data in ancillary
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE
    ]
    return (kinds[0] if kinds else RECORD_DATA), body


def send_record(conn: socket.socket, kind: int, body: bytes) -> None:
    conn.sendmsg([body], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes((kind,)))])


#: How a hostile server answers a request, after a login that went well.
HOSTILE: dict[str, Callable[[socket.socket, int], object]] = {
    "unknown-handle": lambda conn, handle: conn.sendall(
        REPLY.pack(REPLY_MAGIC, 0, handle ^ (1 << 40))
    ),
    "bad-magic": lambda conn, handle: conn.sendall(REPLY.pack(0x4E424C00, 0, handle)),
    # A fatal internal_error alert: a TLS record that is not application data.
    "tls-alert": lambda conn, handle: send_record(conn, RECORD_ALERT, b"\x02\x50"),
    "garbage": lambda conn, handle: conn.sendall(random.Random(handle).randbytes(64)),
    "silent": lambda conn, handle: None,
}


class FakeServer:
    """Serves one in-memory export over kTLS; faults are armed per test."""

    def __init__(self) -> None:
        self.data = bytearray(EXPORT_SIZE)
        self.listen = socket.socket()
        self.listen.bind(("127.0.0.1", 0))
        self.listen.listen(8)
        self.port = self.listen.getsockname()[1]
        self.keyed: dict[int, threading.Event] = {}
        self.lock = threading.Lock()
        self.log: list[tuple[int, int, int, int]] = []
        self.requests_by_port: Counter[tuple[int, int]] = Counter()  # (client port, op) -> requests
        self.connections = 0
        self.disconnects = 0
        self.drop_next: int | None = None  # opcode: close without replying
        self.stall_next: int | None = None  # opcode: never reply
        #: Every request on every connection is answered so (HOSTILE).
        self.hostile: str | None = None
        #: A READ at this offset kills each connection it arrives on.
        self.poison: int | None = None
        #: The TLS record (type, body) that followed a DISCONNECT.
        self.after_disconnect: tuple[int, bytes] | None = None
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self.accept_loop, daemon=True)
        self.accepter.start()

    def keyed_event(self, port: int) -> threading.Event:
        with self.lock:
            return self.keyed.setdefault(port, threading.Event())

    def accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.listen.accept()
            except OSError:
                return
            try:
                install_ktls(conn, tx="s2c", rx="c2s")
            except OSError:  # the driver gave up on this connection already
                conn.close()
                continue
            self.connections += 1
            self.keyed_event(peer[1]).set()
            thread = threading.Thread(target=self.serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def serve(self, conn: socket.socket) -> None:
        port = conn.getpeername()[1]
        with conn:
            while (hdr := recv_exact(conn, REQUEST.size)) is not None:
                magic, flags, op, handle, offset, length, _ = REQUEST.unpack(hdr)
                assert magic == REQUEST_MAGIC
                payload = b""
                if op == OP_WRITE and (payload := recv_exact(conn, length) or b"") == b"":
                    return
                with self.lock:
                    self.log.append((op, flags, offset, length))
                    self.requests_by_port[port, op] += 1
                    if self.drop_next == op:
                        self.drop_next = None
                        return
                    if self.stall_next == op:
                        self.stall_next = None
                        continue
                    if op == OP_READ and offset == self.poison:
                        return
                if self.hostile is not None:
                    HOSTILE[self.hostile](conn, handle)
                    continue
                if op == OP_DISCONNECT:
                    self.disconnects += 1
                    self.after_disconnect = read_record(conn)
                    return
                reply = REPLY.pack(REPLY_MAGIC, 0, handle)
                if op == OP_READ:
                    reply += self.data[offset : offset + length]
                elif op == OP_WRITE:
                    self.data[offset : offset + length] = payload
                elif op in (OP_TRIM, OP_WRITE_ZEROES):
                    self.data[offset : offset + length] = bytes(length)
                try:
                    conn.sendall(reply)
                except OSError:
                    return

    def ops(self, op: int) -> list[tuple[int, int, int, int]]:
        with self.lock:
            return [entry for entry in self.log if entry[0] == op]

    def close(self) -> None:
        self.listen.close()


class FakeBridge:
    """Answers every READY: ACCEPT, install kTLS, DONE (ok or failed), close."""

    def __init__(self, server: FakeServer, flags: int = EXPORT_ALL) -> None:
        self.server = server
        #: Every server it hands connections to, by port (add more to fail over).
        self.servers = {server.port: server}
        self.flags = flags
        self.size = EXPORT_SIZE
        self.fail_reason: str | None = None
        self.handshakes = 0
        self.events = Genl()
        self.events.join()
        self.ctl = Genl()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.events.sock], [], [], 0.1)
            if not ready:
                continue
            self.events.sock.recv(65536)
            while True:
                try:
                    accepted = self.ctl.accept()
                except OSError:
                    break
                self.handshake(accepted)

    def handshake(self, accepted: Accepted) -> None:
        """ACCEPTed attempt -> DONE.  A DONE refused with ENOENT means the
        attempt was already over (a test disconnected meanwhile): the real
        tls-bridge logs that and carries on, and so does this one."""
        sock = socket.socket(fileno=accepted.fd)
        with sock:
            if self.fail_reason is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.ctl.done_failed(accepted, errno.ECONNREFUSED, self.fail_reason)
                return
            server = self.servers[accepted.port]
            assert server.keyed_event(sock.getsockname()[1]).wait(10)
            install_ktls(sock, tx="c2s", rx="s2c")
            self.handshakes += 1
            with contextlib.suppress(FileNotFoundError):
                self.ctl.done_ok(accepted, size=self.size, flags=self.flags)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.events.close()
        self.ctl.close()


@contextlib.contextmanager
def fake_stack(dev: str, flags: int = EXPORT_ALL) -> Iterator[tuple[FakeServer, FakeBridge]]:
    """``dev`` connected to a fake server through a fake bridge."""
    server = FakeServer()
    bridge = FakeBridge(server, flags)
    try:
        configure(dev, "127.0.0.1", server.port, "fake")
        write(dev, "connect", "1")
        assert wait_state(dev, "connected", "error") == "connected", read(dev, "last_error")
        yield server, bridge
    finally:
        with contextlib.suppress(OSError):
            write(dev, "disconnect", "1")
        bridge.close()
        server.close()


@pytest.fixture
def served(dev0: str) -> Iterator[tuple[FakeServer, FakeBridge]]:
    """netblk0 connected to a fake server through a fake bridge."""
    try:
        with fake_stack(dev0) as stack:
            yield stack
    finally:
        for name, value in [
            ("request_timeout_ms", "30000"),
            ("dead_timeout_ms", "30000"),
            ("reconnect_retries", "100"),
        ]:
            write(dev0, name, value)


def aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)


def dio_write(offset: int, data: bytes, flags: int = 0) -> None:
    fd = os.open("/dev/netblk0", os.O_WRONLY | os.O_DIRECT | flags)
    try:
        buf = aligned(len(data))
        buf.write(data)
        assert os.pwrite(fd, buf, offset) == len(data)
    finally:
        os.close(fd)


def dio_read(offset: int, size: int) -> bytes:
    fd = os.open("/dev/netblk0", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned(size)
        assert os.preadv(fd, [buf], offset) == size
        return bytes(buf)
    finally:
        os.close(fd)


#: Connects of the race test; an unanswered first read costs a whole
#: request timeout, which the bound below would show.
RACE_ROUNDS = 100
FIRST_READ_WITHIN = 10.0


def test_the_first_reads_after_connect_are_answered(dev0: str) -> None:
    """Connect, and read at once (both ends of the disk, from two threads,
    beside whatever udev probes), many times: no first request may wait for
    the request timeout (30 s) to be answered."""
    server = FakeServer()
    bridge = FakeBridge(server)
    server.data[:4096] = b"h" * 4096
    server.data[-4096:] = b"t" * 4096
    slowest = 0.0
    timeouts = stats(dev0)["timeouts"]
    try:
        configure(dev0, "127.0.0.1", server.port, "fake")
        for _ in range(RACE_ROUNDS):
            write(dev0, "connect", "1")
            wait_for(lambda: read(dev0, "state") != "connecting", 30, "connect")
            assert wait_state(dev0, "connected", "error") == "connected", read(dev0, "last_error")
            start = time.monotonic()
            readers = [
                background(lambda: dio_read(0, 4096) == b"h" * 4096 or pytest.fail("head")),
                background(
                    lambda: dio_read(EXPORT_SIZE - 4096, 4096) == b"t" * 4096 or pytest.fail("tail")
                ),
            ]
            for thread, raised in readers:
                thread.join(60)
                assert not thread.is_alive() and not raised, raised
            slowest = max(slowest, time.monotonic() - start)
            disconnect(dev0)
    finally:
        with contextlib.suppress(OSError):
            write(dev0, "disconnect", "1")
        bridge.close()
        server.close()
    assert stats(dev0)["timeouts"] == timeouts
    assert slowest < FIRST_READ_WITHIN, slowest


def test_io_roundtrip(served: tuple[FakeServer, FakeBridge]) -> None:
    server, _ = served
    dev = "netblk0"
    base = stats(dev)
    assert read(dev, "connections") == "1"
    assert int(read(dev, "size")) * 512 == EXPORT_SIZE
    assert read(dev, "ro") == "0"
    assert read(dev, "queue/write_cache") == "write back"
    assert read(dev, "queue/fua") == "1"
    assert int(read(dev, "queue/discard_max_hw_bytes")) > 0
    assert int(read(dev, "queue/write_zeroes_max_bytes")) > 0
    assert int(read(dev, "queue/max_hw_sectors_kb")) == 1024

    rng = random.Random(7)
    extents = [(0, 4096), (4096 * 5, 65536), (1 << 20, 1 << 20), (EXPORT_SIZE - 8192, 8192)]
    payloads = {offset: rng.randbytes(size) for offset, size in extents}
    for offset, data in payloads.items():
        dio_write(offset, data)
    for offset, data in payloads.items():
        assert bytes(server.data[offset : offset + len(data)]) == data
        assert dio_read(offset, len(data)) == data
    # A 4 MiB write is split at max_payload (1 MiB).
    big = rng.randbytes(4 << 20)
    dio_write(8 << 20, big)
    assert dio_read(8 << 20, len(big)) == big
    assert max(length for _, _, _, length in server.ops(OP_WRITE)) <= 1 << 20

    # FUA, FLUSH, TRIM, WRITE_ZEROES (NOUNMAP -> NO_HOLE).
    dio_write(0, b"\1" * 4096, os.O_DSYNC)
    assert any(flags & FLAG_FUA for _, flags, _, _ in server.ops(OP_WRITE))
    fd = os.open("/dev/netblk0", os.O_RDWR)
    try:
        os.fsync(fd)
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", 4096 * 5, 65536))
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", 1 << 20, 8192))
    finally:
        os.close(fd)
    assert server.ops(OP_FLUSH)
    assert (OP_TRIM, 0, 4096 * 5, 65536) in server.ops(OP_TRIM)
    assert (OP_WRITE_ZEROES, FLAG_NO_HOLE, 1 << 20, 8192) in server.ops(OP_WRITE_ZEROES)
    assert dio_read(4096 * 5, 65536) == bytes(65536)
    assert dio_read(1 << 20, 8192) == bytes(8192)

    st = {key: value - base[key] for key, value in stats(dev).items()}
    assert st["write_bytes"] >= sum(map(len, payloads.values())) + len(big)
    assert st["read_bytes"] >= sum(map(len, payloads.values())) + len(big)
    assert st["flush_requests"] >= 1
    assert st["discard_requests"] >= 1
    assert st["write_zeroes_requests"] >= 1
    assert st["errors"] == st["timeouts"] == st["reconnects"] == 0
    # A gauge, not a counter: udev's probe may have been in flight at ``base``.
    assert stats(dev)["inflight"] == 0


def test_many_requests_in_flight(served: tuple[FakeServer, FakeBridge]) -> None:
    server, _ = served
    rng = random.Random(11)
    blocks = {index: rng.randbytes(4096) for index in rng.sample(range(EXPORT_SIZE // 4096), 256)}
    errors: list[BaseException] = []

    def worker(items: list[tuple[int, bytes]]) -> None:
        try:
            for index, data in items:
                dio_write(index * 4096, data)
        except BaseException as exc:
            errors.append(exc)

    items = list(blocks.items())
    threads = [threading.Thread(target=worker, args=(items[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for index, data in blocks.items():
        assert bytes(server.data[index * 4096 : (index + 1) * 4096]) == data
    assert stats("netblk0")["inflight"] == 0


def test_connection_loss_requeues_and_reconnects(served: tuple[FakeServer, FakeBridge]) -> None:
    server, bridge = served
    base = stats("netblk0")
    data = random.Random(3).randbytes(65536)
    server.drop_next = OP_WRITE  # receive the write, then die without a reply
    dio_write(1 << 20, data)  # succeeds: requeued and resent after reconnecting
    assert bytes(server.data[1 << 20 : (1 << 20) + len(data)]) == data
    assert read("netblk0", "state") == "connected"
    assert server.connections == 2
    assert bridge.handshakes == 2
    st = stats("netblk0")
    assert st["reconnects"] - base["reconnects"] == 1
    assert st["errors"] == base["errors"]
    assert read("netblk0", "last_error") == "connection lost: server closed the connection"
    assert dio_read(1 << 20, len(data)) == data


def test_a_lost_connection_fails_over_to_the_next_server(dev0: str) -> None:
    """Two servers on one export (the second shares the first's data): a
    write the first takes and never answers is sent again to the second,
    which the device then stays on; stats count the failover."""
    first, second = FakeServer(), FakeServer()
    second.data = first.data
    bridge = FakeBridge(first)
    bridge.servers[second.port] = second
    try:
        write(dev0, "servers", f"127.0.0.1:{first.port},127.0.0.1:{second.port}")
        write(dev0, "export", "fake")
        write(dev0, "connect", "1")
        assert wait_state(dev0, "connected", "error") == "connected", read(dev0, "last_error")
        assert read(dev0, "current_server") == f"127.0.0.1:{first.port}"
        base = stats(dev0)
        assert base["failovers"] == 0
        before = random.Random(11).randbytes(8192)
        dio_write(0, before)
        data = random.Random(12).randbytes(65536)
        first.drop_next = OP_WRITE
        first.close()  # and it does not come back
        dio_write(1 << 20, data)
        assert read(dev0, "state") == "connected"
        assert read(dev0, "current_server") == f"127.0.0.1:{second.port}"
        st = stats(dev0)
        assert st["failovers"] - base["failovers"] == 1
        assert st["reconnects"] - base["reconnects"] == 1
        assert st["errors"] == base["errors"]
        assert (OP_WRITE, 0, 1 << 20, len(data)) in second.ops(OP_WRITE)
        assert dio_read(0, len(before)) == before
        assert dio_read(1 << 20, len(data)) == data
    finally:
        with contextlib.suppress(OSError):
            write(dev0, "disconnect", "1")
        bridge.close()
        first.close()
        second.close()
    assert read(dev0, "current_server") == ""


def test_request_timeout_requeues_and_reconnects(served: tuple[FakeServer, FakeBridge]) -> None:
    server, _ = served
    base = stats("netblk0")
    data = random.Random(5).randbytes(8192)
    dio_write(2 << 20, data)
    write("netblk0", "request_timeout_ms", "1000")
    server.stall_next = OP_READ
    start = time.monotonic()
    assert dio_read(2 << 20, len(data)) == data
    assert time.monotonic() - start >= 0.9
    st = stats("netblk0")
    assert st["timeouts"] - base["timeouts"] == 1
    assert st["reconnects"] - base["reconnects"] == 1
    assert st["errors"] == base["errors"]
    assert "timed out" in read("netblk0", "last_error")
    assert read("netblk0", "state") == "connected"


def test_dead_timeout_fails_io(served: tuple[FakeServer, FakeBridge]) -> None:
    server, bridge = served
    base = stats("netblk0")
    write("netblk0", "dead_timeout_ms", "1500")
    bridge.fail_reason = "login refused: UNAVAILABLE"
    server.drop_next = OP_WRITE
    start = time.monotonic()
    with pytest.raises(OSError) as err:
        dio_write(0, b"x" * 4096)
    assert err.value.errno == errno.EIO
    assert 1.0 <= time.monotonic() - start < 15
    assert read("netblk0", "state") == "error"
    last = read("netblk0", "last_error")
    assert last.startswith("no working connection within dead_timeout_ms (1500 ms), after "), last
    assert last.endswith("reconnect attempts; last: login refused: UNAVAILABLE"), last
    # New I/O fails at once until the next connect.
    with pytest.raises(OSError) as err:
        dio_read(0, 4096)
    assert err.value.errno == errno.EIO
    assert stats("netblk0")["errors"] - base["errors"] >= 2
    # And a new connect brings it back.
    bridge.fail_reason = None
    write("netblk0", "connect", "1")
    assert wait_state("netblk0", "connected", "error") == "connected"
    assert dio_read(0, 4096) == bytes(server.data[0:4096])


def test_reconnect_retries_exhausted(served: tuple[FakeServer, FakeBridge]) -> None:
    server, bridge = served
    write("netblk0", "reconnect_retries", "2")
    bridge.fail_reason = "server unavailable"
    server.drop_next = OP_READ
    with pytest.raises(OSError) as err:
        dio_read(0, 4096)
    assert err.value.errno == errno.EIO
    assert read("netblk0", "state") == "error"
    assert read("netblk0", "last_error") == (
        "gave up after 2 reconnect attempts (reconnect_retries); last: server unavailable"
    )


def test_reconnect_disabled(served: tuple[FakeServer, FakeBridge]) -> None:
    server, _ = served
    write("netblk0", "reconnect_retries", "0")
    server.drop_next = OP_READ
    with pytest.raises(OSError) as err:
        dio_read(0, 4096)
    assert err.value.errno == errno.EIO
    assert read("netblk0", "state") == "error"
    assert read("netblk0", "last_error") == "connection lost: server closed the connection"


HOSTILE_DEAD_MS = 4000
HOSTILE_REQUEST_MS = 2000


@pytest.mark.parametrize("misbehaviour", sorted(HOSTILE))
def test_a_server_that_logs_in_then_misbehaves_fails_io_in_bounded_time(
    served: tuple[FakeServer, FakeBridge], misbehaviour: str
) -> None:
    """Each reconnect succeeds and then answers nothing: that must not renew
    the outage's deadline, so I/O ends in EIO within dead_timeout_ms plus one
    request timeout (however many times the server logs the device in), and
    disconnect and rmmod still work."""
    server, bridge = served
    write("netblk0", "dead_timeout_ms", str(HOSTILE_DEAD_MS))
    write("netblk0", "request_timeout_ms", str(HOSTILE_REQUEST_MS))
    server.hostile = misbehaviour
    # The bound, with room for the reconnects' handshakes under emulation.
    bound = (HOSTILE_DEAD_MS + HOSTILE_REQUEST_MS) / 1000 + 10
    start = time.monotonic()
    # The first read ends by its resend budget or by the deadline; a read
    # after it (on a connection the server logged in again) by the deadline.
    for offset in (1 << 20, 2 << 20):
        with pytest.raises(OSError) as err:
            dio_read(offset, 4096)
        assert err.value.errno == errno.EIO
        assert time.monotonic() - start < bound
    assert bridge.handshakes >= 2, "the server must have logged the device in again"
    assert read("netblk0", "state") == "error"
    last = read("netblk0", "last_error")
    assert last.startswith(
        f"no working connection within dead_timeout_ms ({HOSTILE_DEAD_MS} ms), after "
    ), last
    disconnect("netblk0")
    rmmod()
    assert not loaded()
    insmod(nr_devices=2, connections=1)  # for the fixtures' teardown
    assert read("netblk0", "state") == "disconnected"


def test_a_request_that_kills_every_connection_fails_alone(
    served: tuple[FakeServer, FakeBridge],
) -> None:
    """A poison request is sent again at most NETBLK_MAX_RESENDS (5) times,
    then fails with EIO; the device reconnects and the rest of the I/O works."""
    server, _ = served
    base = stats("netblk0")
    poison = 4 << 20
    server.poison = poison
    with pytest.raises(OSError) as err:
        dio_read(poison, 4096)
    assert err.value.errno == errno.EIO
    assert len([op for op in server.ops(OP_READ) if op[2] == poison]) == 1 + 5
    data = random.Random(21).randbytes(8192)
    dio_write(8 << 20, data)
    assert dio_read(8 << 20, len(data)) == data
    assert read("netblk0", "state") == "connected"
    st = stats("netblk0")
    assert st["errors"] - base["errors"] == 1
    assert st["reconnects"] - base["reconnects"] == 6


TRACEFS = Path("/sys/kernel/tracing")


@contextlib.contextmanager
def netblk_events() -> Iterator[Callable[[], list[tuple[str, str]]]]:
    """netblk's trace events on, the buffer cleared; yields a reader of
    (event, text) pairs so far."""
    if not (TRACEFS / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    enable = TRACEFS / "events" / "netblk" / "enable"
    (TRACEFS / "trace").write_text("")
    enable.write_text("1")

    def events() -> list[tuple[str, str]]:
        found = []
        for line in (TRACEFS / "trace").read_text().splitlines():
            if line.startswith("#") or ": netblk_" not in line:
                continue
            name, _, text = line.split(": netblk_", 1)[1].partition(": ")
            found.append((f"netblk_{name}", text))
        return found

    try:
        yield events
    finally:
        enable.write_text("0")


def test_trace_events_follow_the_lifecycle_and_each_request(dev0: str) -> None:
    with netblk_events() as events, fake_stack(dev0) as (server, _):
        data = random.Random(31).randbytes(8192)
        dio_write(1 << 20, data)
        assert dio_read(1 << 20, len(data)) == data
        write(dev0, "request_timeout_ms", "1000")
        server.stall_next = OP_READ
        assert dio_read(1 << 20, len(data)) == data  # timed out, requeued, resent
        write(dev0, "request_timeout_ms", "30000")
        seen = events()
    names = [name for name, _ in seen]
    for name in (
        "netblk_connect",
        "netblk_hs_request",
        "netblk_hs_accept",
        "netblk_hs_done",
        "netblk_established",
        "netblk_rq_sent",
        "netblk_rq_done",
        "netblk_rq_timeout",
        "netblk_reconnect",
        "netblk_rq_requeued",
    ):
        assert name in names, (name, seen)
    # The lifecycle in order, on netblk0 and the fake server.
    order = [names.index(n) for n in ("netblk_connect", "netblk_hs_request", "netblk_established")]
    assert order == sorted(order), seen
    text = dict(seen)
    assert text["netblk_connect"].startswith(f"netblk0: connecting to 127.0.0.1:{server.port}")
    assert text["netblk_hs_done"].endswith("done, status 0")
    assert "1 connection(s)" in text["netblk_established"]
    # Requests by handle: each answer or timeout names a request sent, and
    # the WRITE (op 1) was sent and answered.
    handle = re.compile(r"handle (0x[0-9a-f]{16}) op (\d+)")

    def handles(*kinds: str) -> set[tuple[str, str]]:
        return {m.groups() for n, t in seen if n in kinds and (m := handle.search(t))}

    sent = handles("netblk_rq_sent")
    ended = handles("netblk_rq_done", "netblk_rq_timeout")
    assert ended and ended <= sent, (sent, ended)
    writes = {h for h, op in sent if op == "1"}
    assert writes and writes <= {h for h, _ in ended}, seen
    assert any(f"op 1 at {1 << 20}+8192" in t for n, t in seen if n == "netblk_rq_sent"), seen


def background(func: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """Run func in a thread; the list collects what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            func()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


def test_disconnect_while_reconnecting_fails_waiting_io(
    served: tuple[FakeServer, FakeBridge],
) -> None:
    server, bridge = served
    bridge.fail_reason = "server unavailable"
    server.drop_next = OP_WRITE
    thread, raised = background(lambda: dio_write(0, b"w" * 4096))
    wait_state("netblk0", "reconnecting")
    time.sleep(0.3)
    assert thread.is_alive(), "the write must wait while reconnecting"
    disconnect("netblk0")
    thread.join(10)
    assert not thread.is_alive()
    assert len(raised) == 1
    assert isinstance(raised[0], OSError)
    assert raised[0].errno == errno.EIO


def test_disconnect_drains_then_fails_a_stuck_request(
    served: tuple[FakeServer, FakeBridge],
) -> None:
    server, _ = served
    write("netblk0", "request_timeout_ms", "1000")
    server.stall_next = OP_WRITE
    thread, raised = background(lambda: dio_write(0, b"s" * 4096))
    wait_for(lambda: server.ops(OP_WRITE), 10, "the write at the server")
    start = time.monotonic()
    disconnect("netblk0")
    assert 0.5 <= time.monotonic() - start < 10
    thread.join(10)
    assert len(raised) == 1
    assert isinstance(raised[0], OSError)
    assert raised[0].errno == errno.EIO
    assert read("netblk0", "size") == "0"


def test_read_only_export(dev0: str) -> None:
    server = FakeServer()
    bridge = FakeBridge(server, flags=EXPORT_READ_ONLY | 0x2)
    try:
        configure(dev0, "127.0.0.1", server.port, "ro")
        write(dev0, "connect", "1")
        assert wait_state(dev0, "connected", "error") == "connected"
        assert read(dev0, "ro") == "1"
        assert read(dev0, "queue/fua") == "0"
        assert read(dev0, "queue/discard_max_hw_bytes") == "0"
        assert read(dev0, "queue/write_zeroes_max_bytes") == "0"
        disconnect(dev0)
        assert read(dev0, "ro") == "0"
    finally:
        bridge.close()
        server.close()


def test_graceful_disconnect(served: tuple[FakeServer, FakeBridge]) -> None:
    server, _ = served
    dio_write(0, b"d" * 4096)
    disconnect("netblk0")
    assert read("netblk0", "size") == "0"
    wait_for(lambda: server.disconnects == 1, 10, "DISCONNECT at the server")
    # RFC 8446 6.1: the stream ends with a warning-level close_notify alert.
    wait_for(lambda: server.after_disconnect is not None, 10, "the record after DISCONNECT")
    assert server.after_disconnect == (RECORD_ALERT, b"\x01\x00")
    assert read("netblk0", "last_error") == ""
    with open("/dev/netblk0", "rb") as disk:
        assert disk.read(4096) == b""


def test_rmmod_waits_for_readers_and_works_once_disconnect_fails_them(
    served: tuple[FakeServer, FakeBridge],
) -> None:
    """While reconnecting, a process reading the device holds it open, and
    the kernel refuses to unload a module whose disk is open; disconnect
    fails the waiting read, and then rmmod works (kmod/README.md)."""
    server, bridge = served
    bridge.fail_reason = "server unavailable"
    server.drop_next = OP_READ
    thread, raised = background(lambda: dio_read(0, 4096))
    wait_state("netblk0", "reconnecting")
    time.sleep(0.3)
    assert thread.is_alive(), "the read must wait while reconnecting"
    result = subprocess.run(["rmmod", "netblk"], check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "in use" in result.stderr, result
    disconnect("netblk0")
    thread.join(10)
    # It ends: EIO, or (if it was still waiting to open behind udev's probe)
    # a short read of the disk that disconnect left at capacity 0.
    assert not thread.is_alive()
    assert len(raised) == 1, raised
    assert isinstance(raised[0], AssertionError) or (
        isinstance(raised[0], OSError) and raised[0].errno == errno.EIO
    ), raised
    rmmod()
    assert not loaded()
    insmod(nr_devices=2, connections=1)  # for the fixtures' teardown


def test_rmmod_while_connected(served: tuple[FakeServer, FakeBridge]) -> None:
    """Last test: unloads the shared module while connected."""
    server, _ = served
    dio_write(0, b"r" * 4096)
    rmmod()
    assert not loaded()
    wait_for(lambda: server.disconnects == 1, 10, "DISCONNECT at the server")
    insmod(nr_devices=2, connections=1)  # for the fixtures' teardown
