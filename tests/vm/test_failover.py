"""netblk.ko with a server list against the real stack: the certificate of
each server reached is checked against that server's own tls-bridge entry,
and a failover under fio verify.  The same storaged is the second server
behind a proxy (tests/vm/test_rbd_failover.py has two storaged instances on
one RBD image).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests.vm.stage import (
    BridgeProcess,
    Stage,
    bridge_config,
    connect_through,
    finish_fio,
    kernel_stats,
    set_sysfs,
    start_fio,
    sysfs,
)


class Proxy:
    """127.0.0.1:port -> target port, byte for byte, until closed."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._pairs: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._pairs += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self._pairs:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_each_server_reached_is_checked_against_its_own_name(stage: Stage) -> None:
    """The server list's second entry reaches the same storaged through a
    proxy.  Its tls-bridge entry expects another certificate name: the
    attempt there fails on the name; with the right name the device
    connects there, and a failover from the proxy to the direct address
    happens under I/O."""
    proxy = Proxy(stage.stack.port)
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    stage.bridge.stop()
    (root := stage.stack.root / "two-servers").mkdir(exist_ok=True)
    bridge = BridgeProcess(root, "")
    try:
        bridge.config.write_text(
            bridge_config(stage.stack, ports=[proxy.port], server_name="wrong.example")
        )
        bridge.start()
        assert connect_through(dead_port, proxy.port) == "error"
        reason = sysfs("netblk0", "last_error")
        assert "wrong.example" in reason or "hostname" in reason.lower(), reason
        bridge.stop()

        bridge.config.write_text(bridge_config(stage.stack, ports=[proxy.port, stage.stack.port]))
        bridge.start()
        state = connect_through(proxy.port, stage.stack.port)
        assert state == "connected", sysfs("netblk0", "last_error")
        assert sysfs("netblk0", "current_server") == f"127.0.0.1:{proxy.port}"
        before = kernel_stats("netblk0")
        job = start_fio()
        time.sleep(3)
        proxy.close()
        finish_fio(job)
        assert sysfs("netblk0", "current_server") == f"127.0.0.1:{stage.stack.port}"
        after = kernel_stats("netblk0")
        assert after["failovers"] - before["failovers"] == 1
        assert after["errors"] == before["errors"]
    finally:
        proxy.close()
        with contextlib.suppress(OSError):
            set_sysfs("netblk0", "disconnect", "1")
        bridge.stop()
        stage.bridge.start()
