"""Two storaged on one RBD export, with netblk.ko in the guest: the Ceph mini
cluster runs here too (memstore: the guest's /tmp takes no O_DIRECT, which
bluestore needs; nothing here kills an OSD), the two instances share the
image as active and standby, and fio verifies its writes across a kill -9
of the active.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph_cluster import MiniCluster, mini_cluster
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import ServerProcess, Stack
from tests.vm.module import insmod, rmmod
from tests.vm.stage import (
    BridgeProcess,
    bridge_config,
    connect_through,
    finish_fio,
    kernel_stats,
    set_sysfs,
    start_fio,
    sysfs,
)

#: Slow beats under software emulation: a standby must not take over from
#: an active that is merely slow.
FAILOVER = '[failover]\ninstance = "{name}"\nlease_interval = 1.0\ntakeover_after = 6.0\n'
VOLUME = 32 << 20


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniCluster]:
    with mini_cluster(tmp_path_factory.mktemp("ceph"), "memstore") as cluster:
        yield cluster


def role(server: ServerProcess) -> str:
    return str(server.stack.snapshot()["volumes"]["data"].get("role"))


def wait_for_role(server: ServerProcess, wanted: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while role(server) != wanted:
        assert time.monotonic() < deadline, f"{server.stack.root.name} is {role(server)}"
        time.sleep(0.5)


@pytest.fixture
def active_and_standby(
    pki: PkiFiles, tmp_path: Path, ceph: MiniCluster
) -> Iterator[tuple[ServerProcess, ServerProcess, BridgeProcess]]:
    subprocess.run(["modprobe", "tls"], check=True)
    insmod(nr_devices=1)
    first = Stack(
        pki=pki, root=tmp_path / "a", ceph=ceph, volume_size=VOLUME,
        extra_config=FAILOVER.format(name="a"),
    )  # fmt: skip
    second = Stack(pki=pki, root=tmp_path / "b", twin=first, extra_config=FAILOVER.format(name="b"))
    a, b = ServerProcess(first), ServerProcess(second)
    bridge = BridgeProcess(first.root, bridge_config(first, ports=[first.port, second.port]))
    try:
        a.start()
        wait_for_role(a, "active")
        b.start()
        wait_for_role(b, "standby")
        bridge.start()
        yield a, b, bridge
    finally:
        with contextlib.suppress(OSError):
            set_sysfs("netblk0", "disconnect", "1")
        bridge.stop()
        a.stop()
        b.stop()
        rmmod()


def test_kill_9_of_the_active_storaged_under_fio_verify(
    active_and_standby: tuple[ServerProcess, ServerProcess, BridgeProcess],
) -> None:
    """netblk0 lists the active then the standby.  kill -9 the active while
    fio writes: the standby takes the image over (its lease went stale),
    the device fails over to it within the dead timeout and fio verifies
    every block it wrote, 0 errors."""
    a, b, _bridge = active_and_standby
    set_sysfs("netblk0", "request_timeout_ms", "20000")
    set_sysfs("netblk0", "dead_timeout_ms", "180000")
    state = connect_through(a.stack.port, b.stack.port)
    assert state == "connected", sysfs("netblk0", "last_error")
    assert sysfs("netblk0", "current_server") == f"127.0.0.1:{a.stack.port}"
    before = kernel_stats("netblk0")
    job = start_fio()
    time.sleep(10)
    assert job.poll() is None, "fio finished before the kill"
    killed = time.monotonic()
    a.signal(signal.SIGKILL)
    wait_for_role(b, "active")
    took_over = time.monotonic() - killed
    result = finish_fio(job)
    after = kernel_stats("netblk0")
    assert after["failovers"] - before["failovers"] == 1
    assert after["errors"] == before["errors"]
    assert sysfs("netblk0", "state") == "connected"
    assert sysfs("netblk0", "current_server") == f"127.0.0.1:{b.stack.port}"
    written = result["write"]["io_bytes"]
    report = f"standby active {took_over:.1f} s after kill -9; fio wrote {written} B"
    if artifacts := os.environ.get("NETBLK_ARTIFACTS"):
        (Path(artifacts) / "rbd-failover.txt").write_text(report + "\n")
