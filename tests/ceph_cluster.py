"""A throwaway Ceph cluster on 127.0.0.1 for tests: one monitor, one
manager and three OSDs as plain background processes (there is no systemd
here), cephx on, pools of size 3 / min_size 2 over one host.

``MiniCluster.start()`` makes and boots it under a directory and waits for
every placement group to be active+clean; ``stop()`` ends every daemon by
the PID it recorded.  The monitor's ports are fixed (3300 and 6789), so one
cluster runs per machine at a time.  memstore keeps an OSD's objects in its
memory (fast; a killed one loses them), bluestore on sparse files survives
a kill -9.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MON_ADDR = "[v2:127.0.0.1:3300,v1:127.0.0.1:6789]"
OSDS = 3
POOL = "netblk"
#: cephx user storaged runs as: RBD rights on the pool only.
CLIENT = "netblk"
BOOT_TIMEOUT = 300.0
#: What every daemon and tool finds in ceph.conf.
CONF = """[global]
fsid = {fsid}
mon host = {mon}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd crush chooseleaf type = 0
osd pool default size = 3
osd pool default min size = 2
osd pool default pg autoscale mode = off
mon allow pool size one = false
mon warn on pool no redundancy = false
mon osd down out interval = 0
osd heartbeat interval = 1
osd heartbeat grace = 5
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
pid file = {dir}/run/$name.pid
keyring = {dir}/keyring.$name
mon data = {dir}/mon/$name
osd data = {dir}/osd/$name
mgr data = {dir}/mgr/$name
osd objectstore = {objectstore}
memstore device bytes = 1073741824
bluestore block path = {dir}/osd/$name.blockfile
bluestore block size = 4294967296
bluestore block create = true
ms bind ipv6 = false
mgr initial modules =
[client]
rbd skip partial discard = false
"""


def _run(*argv: str | Path, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], input=stdin, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {result.returncode}\n{result.stderr}")
    return result.stdout


@dataclass
class MiniCluster:
    """One test cluster: its directory, configuration and daemons."""

    dir: Path
    objectstore: str = "memstore"
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    def keyring(self, name: str = f"client.{CLIENT}") -> Path:
        return self.dir / f"keyring.{name}"

    def ceph(self, *args: str) -> str:
        """The ``ceph`` tool as client.admin."""
        return _run("ceph", "--conf", self.conf, "--name", "client.admin", *args)

    def rbd(self, *args: str) -> str:
        return _run("rbd", "--conf", self.conf, "--name", "client.admin", *args)

    def start(self) -> MiniCluster:
        for sub in ("run", "log", "mon", "osd", "mgr"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.conf.write_text(
            CONF.format(fsid=fsid, mon=MON_ADDR, dir=self.dir, objectstore=self.objectstore)
        )
        self._monitor(fsid)
        self._manager()
        for _ in range(OSDS):
            self._osd()
        self.wait_healthy()
        self.ceph("osd", "pool", "create", POOL, "32")
        self.rbd("pool", "init", POOL)
        self.ceph(
            "auth",
            "get-or-create",
            f"client.{CLIENT}",
            "mon",
            "profile rbd",
            "osd",
            f"profile rbd pool={POOL}",
            "mgr",
            f"profile rbd pool={POOL}",
            "-o",
            str(self.keyring()),
        )
        self.wait_healthy()
        return self

    def _daemon(self, name: str, argv: list[str | Path]) -> None:
        log = (self.dir / "log" / f"{name}.out").open("ab")
        with log:
            proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=log)
        self.pids[name] = proc.pid

    def _monitor(self, fsid: str) -> None:
        mon_keyring = self.keyring("mon.a")
        admin = self.keyring("client.admin")
        _run(
            "ceph-authtool",
            "--create-keyring",
            mon_keyring,
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        )
        _run(
            "ceph-authtool",
            "--create-keyring",
            admin,
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
            "--cap",
            "mds",
            "allow *",
        )
        _run("ceph-authtool", mon_keyring, "--import-keyring", admin)
        monmap = self.dir / "monmap"
        _run("monmaptool", "--create", "--addv", "a", MON_ADDR, "--fsid", fsid, monmap)
        _run(
            "ceph-mon",
            "--conf",
            self.conf,
            "--mkfs",
            "-i",
            "a",
            "--monmap",
            monmap,
            "--keyring",
            mon_keyring,
        )
        self._daemon("mon.a", ["ceph-mon", "-f", "--conf", self.conf, "-i", "a"])

    def _manager(self) -> None:
        (self.dir / "mgr" / "mgr.x").mkdir(exist_ok=True)
        self.ceph(
            "auth",
            "get-or-create",
            "mgr.x",
            "mon",
            "allow profile mgr",
            "osd",
            "allow *",
            "mds",
            "allow *",
            "-o",
            str(self.keyring("mgr.x")),
        )
        self._daemon("mgr.x", ["ceph-mgr", "-f", "--conf", self.conf, "-i", "x"])

    def _osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        name = f"osd.{osd_id}"
        (self.dir / "osd" / name).mkdir()
        self.ceph(
            "auth",
            "get-or-create",
            name,
            "mon",
            "allow profile osd",
            "osd",
            "allow *",
            "mgr",
            "allow profile osd",
            "-o",
            str(self.keyring(name)),
        )
        _run(
            "ceph-osd",
            "--conf",
            self.conf,
            "-i",
            osd_id,
            "--mkfs",
            "--osd-uuid",
            osd_uuid,
            "--no-mon-config",
        )
        self.start_osd(osd_id)

    def start_osd(self, osd_id: str) -> None:
        self._daemon(f"osd.{osd_id}", ["ceph-osd", "-f", "--conf", self.conf, "-i", osd_id])

    def kill_osd(self, osd_id: str) -> None:
        """kill -9 one OSD (it stays down until ``start_osd``)."""
        os.kill(self.pids.pop(f"osd.{osd_id}"), signal.SIGKILL)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, json.JSONDecodeError):
                status = json.loads(self.ceph("status", "--format", "json"))
                osds = status["osdmap"]
                pgs = status["pgmap"]
                states = {s["state_name"]: s["count"] for s in pgs.get("pgs_by_state", [])}
                if (
                    osds["num_up_osds"] == OSDS
                    and osds["num_in_osds"] == OSDS
                    and states.get("active+clean", 0) == pgs["num_pgs"]
                ):
                    return
            time.sleep(1)
        raise RuntimeError(f"the test cluster did not become healthy: {self.ceph('status')}")

    def stop(self) -> None:
        for pid in reversed(list(self.pids.values())):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for pid in self.pids.values():
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pids.clear()


@contextlib.contextmanager
def mini_cluster(root: Path, objectstore: str = "memstore") -> Iterator[MiniCluster]:
    if not shutil.which("ceph-mon"):
        raise RuntimeError("Ceph is not installed (scripts/bootstrap installs it)")
    cluster = MiniCluster(root, objectstore)
    try:
        yield cluster.start()
    finally:
        # stores still open (a server's volumes in a reference cycle) close
        # while the cluster can still answer them
        gc.collect()
        cluster.stop()
