"""The tls-bridge command: config check, one-line errors, no driver."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.storaged.stack import Stack
from tests.tls_bridge.support import server_entry
from tls_bridge.cli import main

TLS_BRIDGE = str(Path(sys.executable).with_name("tls-bridge"))


def write_config(stack: Stack, path: Path) -> Path:
    entry = server_entry(stack)
    path.write_text(
        '[log]\nformat = "text"\n[[servers]]\n'
        f'address = "127.0.0.1"\nport = {stack.port}\n'
        f'ca = "{entry.ca}"\ncert = "{entry.cert}"\nkey = "{entry.key}"\n'
        f'token_file = "{entry.token_file}"\n'
    )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TLS_BRIDGE, *args], capture_output=True, text=True, check=False)


def test_check_config(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(stack, tmp_path / "bridge.toml")
    assert main(["--config", str(config), "--check-config"]) == 0
    assert capsys.readouterr().out == f"{config}: ok (1 servers)\n"


def test_bad_config_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[servers]]\naddress = "storage.example"\n')
    result = run("--config", str(bad))
    assert result.returncode == 1
    assert result.stderr == (
        "tls-bridge: error: servers[0].address: expected an IP address, got 'storage.example'\n"
    )
    missing = run("--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "cannot read" in missing.stderr


def test_without_the_driver_it_exits_with_a_clear_error(stack: Stack, tmp_path: Path) -> None:
    result = run("--config", str(write_config(stack, tmp_path / "bridge.toml")))
    if result.returncode == 0:
        pytest.skip("netblk.ko is loaded here")
    assert result.returncode == 1
    assert result.stderr.startswith("tls-bridge: error: ")
    assert "netblk" in result.stderr
    assert "Traceback" not in result.stderr
