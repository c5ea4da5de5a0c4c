"""The admin API in the guest, in front of the real netblk.ko, storaged and
tls-bridge: everything through ``curl``, as an operator would do it.

Sets the target, connects and waits, reads state and stats and checks them
against ``/sys/block/netblk0`` itself, moves the stats with direct I/O and
checks they move by exactly that much (in the JSON and in /metrics),
refuses a change while connected, then disconnects.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netblk.tokens import generate_token, hash_token
from tests.storaged.stack import free_port
from tests.vm.stage import CONNECT_WAIT, START_WAIT, Stage, kernel_stats, run, sysfs

DEVICE = "netblk0"
WRITE_MIB = 8
READ_MIB = 4
MIB = 1 << 20
#: curl gives up a little after the API's own wait would.
CURL_MAX_TIME = CONNECT_WAIT + 60
STABLE_READS = 20


@dataclass
class Api:
    url: str
    #: ``Authorization: Bearer ...`` in a file for ``curl -H @FILE``: the
    #: token stays out of argv (and so out of ps).
    auth_header: Path

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """Status and decoded answer (JSON, or text for /metrics)."""
        argv = ["curl", "-sS", "--max-time", str(CURL_MAX_TIME), "-X", method]
        argv += ["-H", f"@{self.auth_header}", "-w", "\n%{http_code}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
        output = run(*argv, self.url + path, timeout=CURL_MAX_TIME + 30)
        text, _, status = output.rpartition("\n")
        return int(status), text if path == "/metrics" else json.loads(text)


@pytest.fixture(scope="module")
def api(stage: Stage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("admin-api")
    token = generate_token()
    auth_header = root / "auth.header"
    auth_header.write_text(f"Authorization: Bearer {token}\n")
    auth_header.chmod(0o600)
    port = free_port()
    config = root / "admin-api.toml"
    config.write_text(
        f'[api]\nlisten = "127.0.0.1"\nport = {port}\n[log]\nlevel = "DEBUG"\n'
        f'[tokens.vm]\ntoken_hash = "{hash_token(token)}"\n'
    )
    script = Path(sys.executable).with_name("netblk-admin-api")
    with (root / "admin-api.log").open("ab") as log:
        proc = subprocess.Popen([str(script), "--config", str(config)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_WAIT
    health = ["curl", "-sf", f"{url}/v1/health"]
    while subprocess.run(health, capture_output=True, check=False).returncode:
        assert proc.poll() is None, (root / "admin-api.log").read_text()
        assert time.monotonic() < deadline, "netblk-admin-api did not start"
        time.sleep(0.2)
    try:
        yield Api(url, auth_header)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def settled_stats(api: Api) -> tuple[dict[str, int], dict[str, int]]:
    """The API's stats and the kernel's own, from a moment nothing moved:
    udev probes the new disk after a connect, so wait for a quiet read."""
    run("udevadm", "settle", "-t", "30", timeout=60)
    for _ in range(STABLE_READS):
        before = kernel_stats(DEVICE)
        status, answer = api.call("GET", f"/v1/devices/{DEVICE}/stats")
        assert status == 200, answer
        if kernel_stats(DEVICE) == before:
            return answer, before
        time.sleep(0.5)
    raise AssertionError("netblk0's stats never held still")


def metric(text: str, name: str) -> int:
    prefix = f'{name}{{device="{DEVICE}"}} '
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return int(line.removeprefix(prefix))


def test_an_operator_drives_the_driver_with_curl(stage: Stage, api: Api) -> None:
    status, answer = api.call("GET", "/v1/devices")
    assert status == 200, answer
    assert [device["name"] for device in answer["devices"]] == ["netblk0", "netblk1"]

    target = {"server_ip": "127.0.0.1", "server_port": stage.stack.port, "export": "data"}
    status, answer = api.call("PATCH", f"/v1/devices/{DEVICE}/config", target)
    assert status == 200, answer
    assert answer["config"] | target == answer["config"]
    assert (sysfs(DEVICE, "server_ip"), sysfs(DEVICE, "export")) == ("127.0.0.1", "data")
    assert sysfs(DEVICE, "server_port") == str(stage.stack.port)

    status, answer = api.call("PATCH", f"/v1/devices/{DEVICE}/config", {"server_port": 0})
    assert status == 422, answer
    assert sysfs(DEVICE, "server_port") == str(stage.stack.port)

    connect = f"/v1/devices/{DEVICE}/connect?wait=true&timeout={CONNECT_WAIT:g}"
    status, answer = api.call("POST", connect)
    assert status == 200, answer
    assert answer["state"] == sysfs(DEVICE, "state") == "connected"

    status, answer = api.call("PATCH", f"/v1/devices/{DEVICE}/config", {"export": "other"})
    assert (status, answer["error"], answer["state"]) == (409, "busy", "connected")
    assert sysfs(DEVICE, "export") == "data"

    stats, kernel = settled_stats(api)
    assert stats == kernel
    status, device = api.call("GET", f"/v1/devices/{DEVICE}")
    assert status == 200, device
    assert device["state"] == sysfs(DEVICE, "state")
    assert device["last_error"] is None

    # Separate windows: closing a disk opened for writing makes udev probe it
    # (buffered reads), so only the write's bytes are exact across the dd.
    run("dd", "if=/dev/urandom", f"of=/dev/{DEVICE}", "bs=1M", f"count={WRITE_MIB}",
        "oflag=direct", "status=none")  # fmt: skip
    written, kernel = settled_stats(api)
    assert written == kernel
    assert written["write_bytes"] - stats["write_bytes"] == WRITE_MIB * MIB
    # At most 1 MiB a request (MAX_PAYLOAD), so at least one per MiB.
    assert written["write_requests"] - stats["write_requests"] >= WRITE_MIB
    run("dd", f"if=/dev/{DEVICE}", "of=/dev/null", "bs=1M", f"count={READ_MIB}",
        "iflag=direct", "status=none")  # fmt: skip
    after, kernel = settled_stats(api)
    assert after == kernel
    assert after["read_bytes"] - written["read_bytes"] == READ_MIB * MIB
    assert after["read_requests"] - written["read_requests"] >= READ_MIB
    assert after["write_bytes"] == written["write_bytes"]
    assert after["errors"] == stats["errors"]
    assert after["inflight"] == 0

    status, text = api.call("GET", "/metrics")
    assert status == 200
    assert metric(text, "netblk_write_bytes_total") == after["write_bytes"]
    assert metric(text, "netblk_read_bytes_total") == after["read_bytes"]
    assert f'netblk_state{{device="{DEVICE}",state="connected"}} 1' in text

    status, answer = api.call("POST", f"/v1/devices/{DEVICE}/disconnect?wait=true")
    assert status == 200, answer
    assert answer["state"] == sysfs(DEVICE, "state") == "disconnected"
    assert sysfs(DEVICE, "size") == "0"


def test_the_api_refuses_strangers_and_unknown_devices(api: Api) -> None:
    stranger = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{api.url}/v1/devices"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert stranger.stdout == "401"
    status, answer = api.call("POST", "/v1/devices/netblk9/connect")
    assert (status, answer["error"]) == (404, "unknown_device")
    status, answer = api.call("GET", "/v1/devices/..%2F..%2Fetc")
    assert status == 404
