"""The real client-side stack in the guest, shared by the VM suites that
need it (the ``stage`` fixture in conftest.py): netblk.ko, storaged and
tls-bridge as processes on loopback, and helpers to drive the driver's sysfs.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storaged.cli import main as storaged_cli
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import ServerProcess, Stack
from tests.tls_bridge.conftest import RELAXED_THROTTLE
from tests.vm.module import insmod, rmmod

SYS = Path("/sys/block")
VOLUME = 256 << 20
#: Bounds against hangs, not speed checks: under software emulation (and
#: with another guest on the same 2 cores) a login's argon2id and a Python
#: start-up take tens of seconds.
CONNECT_WAIT = 300.0
START_WAIT = 300.0


def sysfs(dev: str, name: str) -> str:
    return (SYS / dev / name).read_text().strip()


def set_sysfs(dev: str, name: str, value: str) -> None:
    (SYS / dev / name).write_text(value)


def kernel_stats(dev: str) -> dict[str, int]:
    pairs = (line.split(":") for line in sysfs(dev, "stats").splitlines())
    return {key.strip(): int(value) for key, value in pairs}


def wait_state(dev: str, wanted: set[str], timeout: float = CONNECT_WAIT) -> str:
    deadline = time.monotonic() + timeout
    while (state := sysfs(dev, "state")) not in wanted:
        assert time.monotonic() < deadline, f"{dev} stuck in {state}: {sysfs(dev, 'last_error')}"
        time.sleep(0.1)
    return state


def connect_through(*ports: int, dev: str = "netblk0", export: str = "data") -> str:
    """Connect ``dev`` through the server list 127.0.0.1 at ``ports``."""
    set_sysfs(dev, "servers", " ".join(f"127.0.0.1:{port}" for port in ports))
    set_sysfs(dev, "export", export)
    set_sysfs(dev, "connect", "1")
    return wait_state(dev, {"connected", "error"})


#: Random 4 KiB writes over 8 MiB, then every block read back and checked.
FIO = [
    "fio", "--name=failover", "--filename=/dev/netblk0", "--ioengine=libaio",
    "--direct=1", "--bs=4k", "--iodepth=8", "--size=8m", "--rw=randwrite",
    "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json",
]  # fmt: skip


def start_fio() -> subprocess.Popen[str]:
    return subprocess.Popen(FIO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_fio(job: subprocess.Popen[str]) -> dict[str, Any]:
    """fio's job report, once it ended well: exit 0, no error, verified."""
    out, err = job.communicate(timeout=1200)
    assert job.returncode == 0, err
    result: dict[str, Any] = json.loads(out)["jobs"][0]
    assert result["error"] == 0
    return result


def run(*argv: str, timeout: float = 600) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout).stdout


class BridgeProcess:
    """``tls-bridge --config`` as a child process."""

    def __init__(self, root: Path, config: str) -> None:
        self.config = root / "tls-bridge.toml"
        self.config.write_text(config)
        self.log = root / "tls-bridge.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = Path(sys.executable).with_name("tls-bridge")
        with self.log.open("ab") as log:
            seen = log.tell()  # earlier bridges logged "started" too
            self.proc = subprocess.Popen(
                [str(script), "--config", str(self.config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_WAIT
        while b'"started"' not in self.log.read_bytes()[seen:]:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "tls-bridge did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0, self.log.read_text()


def bridge_config(
    stack: Stack, client: str = "alice", *, ports: Sequence[int] = (), **overrides: str
) -> str:
    """One [[servers]] entry for 127.0.0.1 at each of ``ports`` (default:
    the stack's), all with ``client``'s credentials."""
    cert, key = stack.client_tls(client)
    token = stack.root / f"{client}.token"
    token.write_text(stack.tokens[client] + "\n")
    token.chmod(0o600)
    lines = ["[log]", 'level = "DEBUG"']
    for port in ports or (stack.port,):
        entry = {
            "address": "127.0.0.1",
            "port": str(port),
            "server_name": "localhost",
            "ca": str(stack.pki.ca_cert),
            "cert": str(cert),
            "key": str(key),
            "token_file": str(token),
        } | overrides
        lines += ["[[servers]]"]
        lines += [f"{k} = {v}" if k == "port" else f'{k} = "{v}"' for k, v in entry.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Stage:
    """The running stack: storaged, tls-bridge and the loaded driver."""

    stack: Stack
    storaged: ServerProcess
    bridge: BridgeProcess

    def connect(self, dev: str = "netblk0", export: str = "data", port: int | None = None) -> str:
        """Connect ``dev`` to storaged (or to whatever listens on ``port``)."""
        set_sysfs(dev, "server_ip", "127.0.0.1")
        set_sysfs(dev, "server_port", str(port or self.stack.port))
        set_sysfs(dev, "export", export)
        set_sysfs(dev, "connect", "1")
        return wait_state(dev, {"connected", "error"})

    def disconnect(self, dev: str = "netblk0") -> None:
        set_sysfs(dev, "disconnect", "1")
        assert wait_state(dev, {"disconnected"}, timeout=CONNECT_WAIT) == "disconnected"

    def storaged_stats(self) -> dict[str, object]:
        with contextlib.redirect_stdout(buffer := io.StringIO()):
            assert storaged_cli(["stats", "--control-socket", str(self.stack.control_socket)]) == 0
        return json.loads(buffer.getvalue())  # type: ignore[no-any-return]


@contextlib.contextmanager
def running_stage(pki: PkiFiles, root: Path) -> Iterator[Stage]:
    """netblk.ko (two devices), storaged and tls-bridge, torn down after."""
    subprocess.run(["modprobe", "tls"], check=True)
    insmod(nr_devices=2)
    # The bad-credential tests fail a login on every connection of a set.
    stack = Stack(pki=pki, root=root, volume_size=VOLUME, extra_config=RELAXED_THROTTLE)
    storaged = ServerProcess(stack)
    storaged.start()
    bridge = BridgeProcess(stack.root, bridge_config(stack))
    bridge.start()
    try:
        yield Stage(stack, storaged, bridge)
    finally:
        for dev in ("netblk0", "netblk1"):
            with contextlib.suppress(OSError):
                set_sysfs(dev, "disconnect", "1")
        bridge.stop()
        storaged.stop()
        rmmod()
