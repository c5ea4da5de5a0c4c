"""The four block devices the benchmark compares, set up inside the guest.

All four keep their bytes in files on one guest tmpfs:

- ``netblk``: the product as shipped: storaged (mutual TLS 1.3 + token, a
  LUKS2 volume) and netblk.ko over kTLS, tls-bridge doing the handshake;
- ``nbd-tls``: the same security with Debian's NBD: nbd-server with TLS
  (client certificates required) exporting a dm-crypt LUKS2 device with the
  same cipher, key size and sector size, nbd-client with its TLS options;
- ``nbd``: nbd-server and nbd-client, no TLS, no encryption;
- ``loop``: a loop device on a file, the ceiling.

Every target uses its tools' defaults except where equal footing needs a
setting (block size 4096, the LUKS2 parameters), and each is filled with
random data before measuring so no read is answered from a hole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from profiles import RBD_PROFILES, Profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/ceph_cluster.py: the mini cluster the tests boot
from tests.ceph_cluster import CLIENT as CEPH_CLIENT  # noqa: E402
from tests.ceph_cluster import POOL as CEPH_POOL  # noqa: E402
from tests.ceph_cluster import MiniCluster  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
NETBLK_KO = REPO / "kmod" / "netblk.ko"
PASSPHRASE = "netblk benchmark passphrase"
#: argon2id cost for the volume keyslots and the token: unlocking is not
#: what we measure, and emulation makes the defaults take minutes.
PBKDF_ARGS = ("--pbkdf-memory", "65536", "--pbkdf-force-iterations", "4")
STARTUP_WAIT = 600.0
NETBLK_PORT = 10910
NBD_TLS_PORT = 10809
NBD_PLAIN_PORT = 10810
#: cryptsetup's default LUKS2 header and keyslot area, before the data.
LUKS2_HEADER = 16 << 20


@dataclass(frozen=True)
class Device:
    """A target, up: its block device and, for netblk, storaged's pid."""

    name: str
    label: str
    path: str
    server_pid: int | None = None


def run(*argv: str | Path) -> str:
    """Run a command to completion; its stdout, or an error with its stderr."""
    result = subprocess.run([str(a) for a in argv], check=False, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {result.returncode}\n{result.stderr}")
    return result.stdout


def wait_until(what: str, ready: Callable[[], bool], timeout: float = STARTUP_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


@contextlib.contextmanager
def daemon(argv: list[str], log: Path, ready: Callable[[], bool], what: str) -> Iterator[int]:
    """A foreground server process, ended with SIGTERM when done."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    try:
        wait_until(what, lambda: ready() or proc.poll() is not None)
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {log.read_text()[-2000:]}")
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def logged(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.exists() and text in log.read_text(errors="replace")


def fill(device: str) -> None:
    """Write every block once with random data (fio's default buffers)."""
    run(
        "fio",
        "--name=fill",
        f"--filename={device}",
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
        "--direct=1",
        "--ioengine=libaio",
        "--output-format=terse",
    )


@dataclass(frozen=True)
class Pki:
    """One CA for everything: storaged's and nbd-server's certificates and
    the client certificate both netblk and nbd-client present."""

    dir: Path
    token_hash: str
    token_file: Path

    @classmethod
    def create(cls, root: Path) -> Pki:
        pki = root / "pki"
        certs = VENV_BIN / "netblk-certs"
        run(certs, "ca", "--dir", pki)
        run(
            certs,
            "server",
            "--dir",
            pki,
            "--name",
            "bench",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        )
        run(certs, "client", "bench", "--dir", pki)
        token_file = root / "bench.token"
        token_hash = run(certs, "token", "--out", token_file).strip()
        return cls(pki, token_hash, token_file)

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def pair(self, who: str) -> tuple[Path, Path]:
        stem = "server" if who == "server" else f"client-{who}"
        return self.dir / f"{stem}.crt", self.dir / f"{stem}.key"


def netblk_volume(root: Path, size: str) -> tuple[Path, Path]:
    """A storaged LUKS2 volume and its passphrase file, in ``root``."""
    root.mkdir(exist_ok=True)
    passphrase = root / "volume.pass"
    passphrase.write_text(PASSPHRASE)
    volume = root / "data.luks"
    run(
        VENV_BIN / "storaged",
        "volume",
        "create",
        volume,
        "--size",
        size,
        "--passphrase-file",
        passphrase,
        *PBKDF_ARGS,
    )
    return volume, passphrase


def rbd_images(ceph: MiniCluster, size: str, passphrase: Path) -> str:
    """Two images of ``size`` in the cluster's pool: ``netblk``, a storaged
    volume made by ``storaged volume create``, and ``raw`` for rbd bench,
    written whole so its reads find data.  Returns the export's
    ``rbd = {...}`` line for ``netblk``."""
    cephx = ["--ceph-client", CEPH_CLIENT, "--ceph-conf", str(ceph.conf)]
    cephx += ["--ceph-keyring", str(ceph.keyring())]
    run(VENV_BIN / "storaged", "volume", "create", f"rbd:{CEPH_POOL}/netblk", "--size", size,
        "--passphrase-file", passphrase, *PBKDF_ARGS, *cephx)  # fmt: skip
    ceph.rbd("create", "--size", size, f"{CEPH_POOL}/raw")
    ceph.rbd("bench", "--io-type", "write", "--io-pattern", "seq", "--io-size", "4M",
             "--io-threads", "4", "--io-total", size, f"{CEPH_POOL}/raw")  # fmt: skip
    return (
        f'rbd = {{ pool = "{CEPH_POOL}", image = "netblk", client = "{CEPH_CLIENT}", '
        f'conf = "{ceph.conf}", keyring = "{ceph.keyring()}" }}'
    )


def rbd_bench(ceph: MiniCluster, profile: Profile, ops: int) -> dict[str, float]:
    """``rbd bench`` on ``raw`` as the profile says (its last line has
    ops/sec), with librbd's cache off, as storaged runs it: rbd bench's
    default cache doubled its random writes here, which a client that must
    not lose an acknowledged write cannot do."""
    kind = "read" if profile.rw == "randread" else "write"
    text = ceph.rbd("bench", "--io-type", kind, "--io-pattern", "rand", "--io-size", "4096",
                    "--io-threads", str(profile.iodepth), "--io-total", str(ops * 4096),
                    "--rbd-cache=false", f"{CEPH_POOL}/raw")  # fmt: skip
    words = text.split()
    return {
        "iops": float(words[words.index("ops/sec:") + 1]),
        "elapsed_s": float(words[words.index("elapsed:") + 1]),
        "ops": ops,
    }


def rbd_rounds(repeat: int) -> Iterator[tuple[int, Profile, str]]:
    """Each run of an RBD bench: round, profile and target ("netblk" or
    "rbd"), the two targets' order alternating from round to round."""
    for round_ in range(1, repeat + 1):
        order = ["netblk", "rbd"] if round_ % 2 else ["rbd", "netblk"]
        for profile in RBD_PROFILES:
            for target in order:
                yield round_, profile, target


def storaged_config(work: Path, pki: Pki, location: str, passphrase: Path) -> Path:
    """``work``/storaged.toml: export ``data`` at ``location`` (its TOML
    line) for client ``bench``, listening on 127.0.0.1:NETBLK_PORT."""
    server_cert, server_key = pki.pair("server")
    config = work / "storaged.toml"
    config.write_text(
        f"""[server]
listen = ["127.0.0.1"]
port = {NETBLK_PORT}
control_socket = "{work}/storaged.sock"
[tls]
cert = "{server_cert}"
key = "{server_key}"
ca = "{pki.ca}"
[log]
format = "text"
[clients.bench]
{pki.token_hash}
[exports.data]
{location}
passphrase_file = "{passphrase}"
trim = true
access = {{ bench = "rw" }}
"""
    )
    return config


@contextlib.contextmanager
def netblk(
    root: Path,
    pki: Pki,
    size: str,
    *,
    name: str = "netblk",
    bin_dir: Path = VENV_BIN,
    made: tuple[Path, Path] | None = None,
    location: str | None = None,
) -> Iterator[Device]:
    """netblk0 served by the storaged and tls-bridge in ``bin_dir`` (an A/B
    runs another commit's), from the volume ``made`` (made here if not given),
    or from what ``location`` says (an export's ``rbd = {...}`` line; ``made``
    then gives the passphrase)."""
    work = root / name
    work.mkdir()
    volume, passphrase = made or netblk_volume(work, size)
    location = location or f'volume = "{volume}"'
    storaged = str(bin_dir / "storaged")
    storaged_config(work, pki, location, passphrase)
    client_cert, client_key = pki.pair("bench")
    (work / "tls-bridge.toml").write_text(
        f"""[log]
format = "text"
[[servers]]
address = "127.0.0.1"
port = {NETBLK_PORT}
server_name = "localhost"
ca = "{pki.ca}"
cert = "{client_cert}"
key = "{client_key}"
token_file = "{pki.token_file}"
"""
    )
    sysfs = Path("/sys/block/netblk0")
    with contextlib.ExitStack() as stack:
        server_log = work / "storaged.log"
        server_pid = stack.enter_context(
            daemon(
                [storaged, "--config", str(work / "storaged.toml")],
                server_log,
                logged(server_log, "storaged listening"),
                "storaged",
            )
        )
        run("modprobe", "tls")
        run("insmod", NETBLK_KO)
        stack.callback(run, "rmmod", "netblk")
        bridge_log = work / "tls-bridge.log"
        stack.enter_context(
            daemon(
                [str(bin_dir / "tls-bridge"), "--config", str(work / "tls-bridge.toml")],
                bridge_log,
                logged(bridge_log, "started"),
                "tls-bridge",
            )
        )
        for attribute, value in (
            ("server_ip", "127.0.0.1"),
            ("server_port", str(NETBLK_PORT)),
            ("export", "data"),
            ("connect", "1"),
        ):
            (sysfs / attribute).write_text(value)
        stack.callback((sysfs / "disconnect").write_text, "1")
        wait_until("netblk0 to connect", lambda: _state(sysfs) in ("connected", "error"))
        if _state(sysfs) != "connected":
            raise RuntimeError(f"netblk0: {(sysfs / 'last_error').read_text().strip()}")
        yield Device(name, "netblk (kTLS, LUKS2)", "/dev/netblk0", server_pid)


def _state(sysfs: Path) -> str:
    return (sysfs / "state").read_text().strip()


NBD_SERVER_CONF = """[generic]
user = root
group = root
listenaddr = 127.0.0.1
port = {port}
{tls}
[bench]
exportname = {path}
"""


@contextlib.contextmanager
def nbd_server(work: Path, port: int, path: str, tls: str = "") -> Iterator[int]:
    config = work / "nbd-server.conf"
    config.write_text(NBD_SERVER_CONF.format(port=port, path=path, tls=tls))
    log = work / "nbd-server.log"
    # -d: stay in the foreground so we own its lifetime
    with daemon(
        ["nbd-server", "-d", "-C", str(config)], log, lambda: _listening(port), "nbd-server"
    ) as pid:
        yield pid


def _listening(port: int) -> bool:
    return f":{port:04X} 00000000:0000 0A" in Path("/proc/net/tcp").read_text()


@contextlib.contextmanager
def nbd_client(device: str, port: int, *tls_args: str | Path) -> Iterator[None]:
    run("nbd-client", "127.0.0.1", str(port), device, "-N", "bench", "-b", "4096", *tls_args)
    try:
        yield
    finally:
        run("nbd-client", "-d", device)


@contextlib.contextmanager
def nbd_tls(root: Path, pki: Pki, size: str) -> Iterator[Device]:
    work = root / "nbd-tls"
    work.mkdir()
    backing = _sparse_file(work / "data.luks", size, LUKS2_HEADER)
    key = work / "volume.pass"
    key.write_text(PASSPHRASE)
    run(
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--sector-size",
        "4096",
        "--key-file",
        key,
        *PBKDF_ARGS,
        backing,
    )
    mapped = "netblk-bench-nbd"
    run("cryptsetup", "open", "--key-file", key, backing, mapped)
    server_cert, server_key = pki.pair("server")
    client_cert, client_key = pki.pair("bench")
    tls = (
        f"certfile = {server_cert}\nkeyfile = {server_key}\ncacertfile = {pki.ca}\nforce_tls = true"
    )
    try:
        with (
            nbd_server(work, NBD_TLS_PORT, f"/dev/mapper/{mapped}", tls) as pid,
            nbd_client(
                "/dev/nbd0",
                NBD_TLS_PORT,
                "-certfile",
                client_cert,
                "-keyfile",
                client_key,
                "-cacertfile",
                pki.ca,
                "-tlshostname",
                "localhost",
            ),
        ):
            yield Device("nbd-tls", "NBD + TLS + dm-crypt", "/dev/nbd0", pid)
    finally:
        run("cryptsetup", "close", mapped)


@contextlib.contextmanager
def nbd_plain(root: Path, size: str) -> Iterator[Device]:
    work = root / "nbd"
    work.mkdir()
    backing = _sparse_file(work / "data.img", size)
    with (
        nbd_server(work, NBD_PLAIN_PORT, str(backing)) as pid,
        nbd_client("/dev/nbd1", NBD_PLAIN_PORT),
    ):
        yield Device("nbd", "NBD (no TLS, no encryption)", "/dev/nbd1", pid)


@contextlib.contextmanager
def loop(root: Path, size: str) -> Iterator[Device]:
    work = root / "loop"
    work.mkdir()
    backing = _sparse_file(work / "data.img", size)
    device = run("losetup", "--find", "--show", "--sector-size", "4096", backing).strip()
    try:
        yield Device("loop", "loop device (ceiling)", device)
    finally:
        run("losetup", "--detach", device)


def _sparse_file(path: Path, size: str, extra: int = 0) -> Path:
    """A new file of ``size`` ("512M", "1G") plus ``extra`` bytes, all holes."""
    units = {"M": 1 << 20, "G": 1 << 30}
    path.touch(exist_ok=False)
    os.truncate(path, int(size[:-1]) * units[size[-1]] + extra)
    return path
