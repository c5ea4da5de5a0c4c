"""A real storaged stack for tests: PKI, tokens, LUKS2 volumes, config.

``Stack`` writes everything into a temporary directory; ``serving`` runs the
real StorageServer in the test's event loop, ``ServerProcess`` runs the
``storaged`` console script as a separate process (for kill -9 and SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from netblk.tlsconf import client_context
from netblk.tokens import generate_token, hash_token
from storaged import luks2
from storaged.client import NetblkClient
from storaged.config import load_config
from storaged.server import StorageServer
from tests.ceph_cluster import CLIENT as CEPH_CLIENT
from tests.ceph_cluster import POOL as CEPH_POOL
from tests.ceph_cluster import MiniCluster
from tests.pki_fixtures import PkiFiles

T = TypeVar("T")

VOLUME_SIZE = 64 << 20
PASSPHRASE = b"correct horse battery staple"
#: Exports of the standard stack and who may use them how.
EXPORTS = {
    "data": {"alice": "rw", "bob": "ro"},
    "other": {"bob": "rw"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """Config, volumes and credentials for one storaged instance."""

    pki: PkiFiles
    root: Path
    port: int = field(default_factory=free_port)
    tokens: dict[str, str] = field(default_factory=dict)
    extra_config: str = ""
    volume_size: int = VOLUME_SIZE
    #: Serve every export from an RBD image in this cluster instead of a file
    #: (each volume file is made, then ``rbd import``ed: the migration path).
    ceph: MiniCluster | None = None
    #: Another instance of ``twin``: the same images, clients and tokens,
    #: its own port, config and control socket (a standby for its exports).
    twin: Stack | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "volume.pass").write_bytes(PASSPHRASE + b"\n")
        if self.twin is not None:
            self.ceph = self.twin.ceph
            self.tokens = self.twin.tokens
            self.volume_size = self.twin.volume_size
        else:
            for client in ("alice", "bob"):
                self.tokens[client] = generate_token()
            for export in EXPORTS:
                luks2.format_volume(
                    self.volume_path(export), self.volume_size, PASSPHRASE, luks2.TEST_KDF_PARAMS
                )
                if self.ceph is not None:
                    self.ceph.rbd("import", str(self.volume_path(export)), self.image(export))
        self.config_path.write_text(self.render_config())

    def image(self, export: str) -> str:
        """The RBD image (pool/name) of ``export`` when served from Ceph."""
        if self.twin is not None:
            return self.twin.image(export)
        return f"{CEPH_POOL}/{export}-{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "storaged.toml"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    def volume_path(self, export: str) -> Path:
        if self.twin is not None:
            return self.twin.volume_path(export)
        return self.root / f"{export}.luks"

    def render_config(self) -> str:
        lines = [
            "[server]",
            'listen = ["127.0.0.1"]',
            f"port = {self.port}",
            f'control_socket = "{self.control_socket}"',
            "workers = 4",
            "[tls]",
            f'cert = "{self.pki.server_cert}"',
            f'key = "{self.pki.server_key}"',
            f'ca = "{self.pki.ca_cert}"',
            "[log]",
            'format = "json"',
            'level = "DEBUG"',
        ]
        for client, token in self.tokens.items():
            lines += [f"[clients.{client}]", f'token_hash = "{hash_token(token)}"']
        for export, access in EXPORTS.items():
            lines += [f"[exports.{export}]", *self._location(export)]
            lines += ['passphrase_file = "volume.pass"', f"[exports.{export}.access]"]
            lines += [f'{client} = "{right}"' for client, right in access.items()]
        return "\n".join(lines) + "\n" + self.extra_config

    def _location(self, export: str) -> list[str]:
        if self.ceph is None:
            return [f'volume = "{self.volume_path(export)}"']
        pool, image = self.image(export).split("/")
        return [
            f'rbd = {{ pool = "{pool}", image = "{image}", conf = "{self.ceph.conf}", '
            f'client = "{CEPH_CLIENT}", keyring = "{self.ceph.keyring()}" }}'
        ]

    def snapshot(self) -> dict[str, Any]:
        """What the control socket answers."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(self.control_socket))
            return dict(json.loads(recv_all(sock)))

    def client_tls(self, client: str = "alice") -> tuple[Path, Path]:
        return getattr(self.pki, f"{client}_cert"), getattr(self.pki, f"{client}_key")

    async def connect(
        self,
        export: str = "data",
        client: str = "alice",
        *,
        token: str | None = None,
        cert: tuple[Path, Path] | None = None,
        ca: Path | None = None,
    ) -> NetblkClient:
        cert_path, key_path = cert or self.client_tls(client)
        context = client_context(ca or self.pki.ca_cert, cert_path, key_path)
        return await NetblkClient.connect(
            "127.0.0.1",
            self.port,
            ssl_context=context,
            export=export,
            token=(token or self.tokens[client]).encode(),
            server_hostname="localhost",
        )


@contextlib.asynccontextmanager
async def serving(stack: Stack) -> AsyncIterator[StorageServer]:
    """Run the real server in this event loop for the duration of the block."""
    server = StorageServer(load_config(stack.config_path))
    await server.open_volumes()
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


class ServerProcess:
    """``storaged --config`` as a child process, logs to a file."""

    def __init__(self, stack: Stack, *, max_files: int | None = None) -> None:
        self.stack = stack
        self.log_path = stack.root / "storaged.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: The process's RLIMIT_NOFILE (soft and hard), if not inherited.
        self.max_files = max_files

    def start(self) -> None:
        script = Path(sys.executable).with_name("storaged")
        max_files = self.max_files

        def limit_files() -> None:
            if max_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(script), "--config", str(self.stack.config_path)],
                stdout=log,
                stderr=log,
                preexec_fn=limit_files,  # noqa: PLW1509 - setrlimit only, nothing thread-unsafe
            )
        # Unlocking volumes runs argon2id: seconds, minutes in an emulated guest.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storaged exited: {self.log_path.read_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.stack.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("storaged did not start listening")

    def signal(self, signum: signal.Signals) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)
        return self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)


def run(coro: object) -> object:
    """asyncio.run with a generous debug-friendly timeout for one test body."""

    async def bounded() -> object:
        return await asyncio.wait_for(coro, timeout=120)  # type: ignore[arg-type]

    return asyncio.run(bounded())


class ThreadedServer:
    """The real server on its own event loop thread, for blocking tests
    (raw sockets, hypothesis) that can't share the test's loop."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.loop = asyncio.new_event_loop()
        self.server: StorageServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()

        async def start() -> StorageServer:
            server = StorageServer(load_config(self.stack.config_path))
            await server.open_volumes()
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=60)
        return self

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop (e.g. a client) and wait."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def __exit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.call(self.server.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


def raw_tls_socket(
    stack: Stack, client: str = "alice", timeout: float = 60, source: str = "127.0.0.1"
) -> ssl.SSLSocket:
    """A blocking TLS connection with ``client``'s certificate, not logged in."""
    cert, key = stack.client_tls(client)
    context = client_context(stack.pki.ca_cert, cert, key)
    sock = socket.create_connection(
        ("127.0.0.1", stack.port), timeout=timeout, source_address=(source, 0)
    )
    return context.wrap_socket(sock, server_hostname="localhost")


def recv_until_closed(sock: ssl.SSLSocket, limit: int = 1 << 22) -> bytes:
    """Everything the server sends until it closes (or the timeout hits)."""
    chunks = []
    total = 0
    with contextlib.suppress(OSError):
        while total < limit and (chunk := sock.recv(65536)):
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
