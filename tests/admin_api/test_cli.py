"""The netblk-admin-api command: config check, one-line errors, and a real
uvicorn serving HTTPS with the test PKI until SIGTERM."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from netblk_admin.cli import main
from tests.admin_api.conftest import AUTH, TOKENS
from tests.admin_api.fake_driver import FakeDriver
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import free_port

ADMIN_API = str(Path(sys.executable).with_name("netblk-admin-api"))
START_WAIT = 60.0


def write_config(path: Path, extra: str = "", **api: object) -> Path:
    settings = "".join(
        f"{key} = {json.dumps(value) if isinstance(value, str) else value}\n"
        for key, value in api.items()
    )
    tokens = "".join(f'[tokens.{n}]\ntoken_hash = "{h}"\n' for n, h in TOKENS.items())
    path.write_text(f"[api]\n{settings}" + '[log]\nformat = "text"\n' + extra + tokens)
    return path


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "api.toml")
    assert main(["--config", str(config), "--check-config"]) == 0
    assert capsys.readouterr().out == f"{config}: ok (2 tokens)\n"


def test_a_bad_config_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = write_config(tmp_path / "api.toml", port=0)
    result = subprocess.run(
        [ADMIN_API, "--config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert result.stderr == "netblk-admin-api: error: api.port: must be 1..65535, got 0\n"


@pytest.fixture
def https_server(
    tmp_path: Path, pki: PkiFiles
) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    root = FakeDriver(tmp_path / "sys-block").root  # files only: this test reads
    port = free_port()
    tls = f'[tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\n'
    config = write_config(tmp_path / "api.toml", tls, port=port, sysfs_root=str(root))
    log = tmp_path / "api.log"
    with log.open("w") as output:
        proc = subprocess.Popen(
            [ADMIN_API, "--config", str(config)], stdout=output, stderr=subprocess.STDOUT, text=True
        )
    try:
        yield f"https://127.0.0.1:{port}", proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_it_serves_https_until_sigterm(
    https_server: tuple[str, subprocess.Popen[str], Path], pki: PkiFiles
) -> None:
    url, proc, log = https_server
    trust = ssl.create_default_context(cafile=str(pki.ca_cert))
    with httpx.Client(base_url=url, verify=trust, headers=AUTH) as client:
        deadline = time.monotonic() + START_WAIT
        while True:
            assert proc.poll() is None, "netblk-admin-api exited"
            try:
                health = client.get("/v1/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "netblk-admin-api did not start"
                time.sleep(0.1)
        assert health.json() == {"status": "ok", "devices": 2}
        assert client.get("/v1/devices/netblk1/config").json()["server_port"] == 10910
        assert client.get("/v1/devices", headers={"Authorization": ""}).status_code == 401
    with pytest.raises(httpx.TransportError):  # HTTPS only
        httpx.get(url.replace("https", "http") + "/v1/health")
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down cleanly, then re-raises the signal (systemd: a clean stop).
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert "Finished server process" in log.read_text()
    assert "\x1b[" not in log.read_text()  # no terminal colours in the log
