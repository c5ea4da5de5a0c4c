"""The storaged command: serve, check-config, stats, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from storaged import luks2
from storaged.cli import main
from storaged.client import RequestError
from tests.storaged.stack import ServerProcess, Stack, run

STORAGED = str(Path(sys.executable).with_name("storaged"))


@pytest.fixture
def process(stack: Stack) -> Iterator[ServerProcess]:
    proc = ServerProcess(stack)
    yield proc
    proc.stop()


def test_check_config(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(stack.config_path), "--check-config"]) == 0
    assert capsys.readouterr().out == f"{stack.config_path}: ok (2 exports, 2 clients)\n"


def test_the_old_check_config_spelling_still_works_and_says_it_is_deprecated(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(stack.config_path), "check-config"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{stack.config_path}: ok (2 exports, 2 clients)\n"
    assert err == (
        "storaged: warning: 'storaged check-config' is deprecated, use 'storaged --check-config'\n"
    )


def test_bad_config_is_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[tls]\ncert = "c"\nkey = "k"\nca = "a"\n[server]\nport = 0\n')
    result = subprocess.run(
        [STORAGED, "--config", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert result.stderr == "storaged: error: server.port: must be 1..65535, got 0\n"


def test_wrong_passphrase_stops_startup_with_a_clear_error(stack: Stack) -> None:
    (stack.root / "volume.pass").write_text("not the passphrase\n")
    result = subprocess.run(
        [STORAGED, "--config", str(stack.config_path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "storaged: error:" in result.stderr
    assert "passphrase" in result.stderr
    assert "Traceback" not in result.stderr


def test_detached_header_stops_startup_with_a_clear_error(stack: Stack) -> None:
    """A detached header (what `cryptsetup luksFormat --header` writes: data at
    offset 0 of another device) named as a volume: storaged would serve the
    header's own 16 MiB as the export, so it refuses to start and writes nothing."""
    volume = stack.volume_path("data")
    fd = os.open(volume, os.O_RDWR)
    try:
        header = luks2._load_header(fd, volume)
        header.raw["segments"]["0"]["offset"] = "0"
        luks2._write_headers(fd, header.identity, header.seqid + 1, header.raw)
        os.ftruncate(fd, luks2.DATA_OFFSET)
    finally:
        os.close(fd)
    before = volume.read_bytes()
    result = subprocess.run(
        [STORAGED, "--config", str(stack.config_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,  # rather than serving the header forever
    )
    assert result.returncode == 1
    error = result.stderr.splitlines()[-1]  # after the debug log lines
    assert error.startswith(f"storaged: error: exports.data: {volume}: ")
    assert error.endswith(
        ": data segment at offset 0 overlaps the LUKS2 header (0-16 MiB): is this a detached "
        "header? storaged needs the header and data in one volume"
    )
    assert volume.read_bytes() == before


def test_stats_over_the_control_socket_match_the_io(
    stack: Stack, process: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    async def io() -> None:
        async with await stack.connect() as client:
            await client.write(0, bytes(8192))
            await client.read(0, 4096)
            await client.flush()
            with pytest.raises(RequestError):
                await client.read(client.info.size, 4096)  # refused: beyond the end

    process.start()
    run(io())
    assert main(["stats", "--control-socket", str(stack.control_socket)]) == 0
    snap = json.loads(capsys.readouterr().out)
    data = snap["exports"]["data"]
    assert data["requests"] == {"flush": 1, "read": 1, "refused": 1, "write": 1}
    assert (data["bytes_written"], data["bytes_read"], data["errors"]) == (8192, 4096, 1)
    assert snap["clients"]["alice"]["requests_total"] == 4
    assert snap["logins_ok"] == 1
    assert stack.control_socket.stat().st_mode & 0o777 == 0o600


def test_stats_without_a_server_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", "--control-socket", str(tmp_path / "none.sock")]) == 1
    assert "cannot reach storaged" in capsys.readouterr().err


def test_logs_are_json_lines(stack: Stack, process: ServerProcess) -> None:
    async def log_in_once() -> None:
        client = await stack.connect()
        await client.close()

    process.start()
    run(log_in_once())
    process.stop()
    entries = [json.loads(line) for line in process.log_path.read_text().splitlines()]
    ready = [e for e in entries if e.get("event") == "export_ready"]
    assert {e["export"] for e in ready} == {"data", "other"}
    login = next(e for e in entries if e.get("event") == "login_ok")
    assert login["client"] == "alice"
    assert login["peer"].startswith("127.0.0.1:")
