"""``storaged volume ...`` driven through a throwaway argparse parser.

The real ``storaged`` entry point wires :func:`volume_cli.register` the same
way; these tests call the handler the parser selects and check exit codes,
output and the resulting volume files.
"""

from __future__ import annotations

import argparse
import getpass
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storaged import luks2, volume_cli

FAST_FLAGS = ["--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"]
PASSPHRASE = b"hunter2 but longer"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storaged")
    volume_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def run(*argv: str | Path) -> int:
    args = build_parser().parse_args([str(a) for a in argv])
    code: int = args.func(args)
    return code


class FakeStdin(io.TextIOWrapper):
    """A non-terminal stdin whose bytes the passphrase reader consumes."""

    def __init__(self, data: bytes, *, tty: bool = False):
        super().__init__(io.BytesIO(data))
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def pass_file(tmp_path: Path) -> Path:
    path = tmp_path / "pass"
    path.write_bytes(PASSPHRASE + b"\n")
    return path


@pytest.fixture
def volume(tmp_path: Path, pass_file: Path) -> Path:
    path = tmp_path / "vol.img"
    assert (
        run("volume", "create", path, "--size", "1M", "--passphrase-file", pass_file, *FAST_FLAGS)
        == 0
    )
    return path


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4096", 4096),
        ("4096B", 4096),
        ("64k", 64 << 10),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("1gb", 1 << 30),
        ("2T", 2 << 40),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert volume_cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1M", "12X", "1 GiBs"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        volume_cli.parse_size(text)


def test_bad_size_is_a_usage_error(tmp_path: Path, pass_file: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        run("volume", "create", tmp_path / "v", "--size", "12X", "--passphrase-file", pass_file)
    assert exc.value.code == 2


def test_unaligned_size_fails_cleanly(
    tmp_path: Path, pass_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        "volume",
        "create",
        tmp_path / "v",
        "--size",
        "1000",
        "--passphrase-file",
        pass_file,
        *FAST_FLAGS,
    )
    assert code == 1
    assert capsys.readouterr().err.startswith("storaged: error: size must be a positive multiple")
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------------------
# create / info
# ---------------------------------------------------------------------------


def test_create_and_info(
    tmp_path: Path, pass_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vol.img"
    code = run(
        "volume",
        "create",
        path,
        "--size",
        "2M",
        "--label",
        "db",
        "--passphrase-file",
        pass_file,
        *FAST_FLAGS,
    )
    assert code == 0
    assert f"created {path}" in capsys.readouterr().out
    # One trailing newline is not part of the passphrase.
    assert len(luks2.unlock(path, PASSPHRASE)) == 64
    info = luks2.read_info(path)
    assert (info.label, info.data_size) == ("db", 2 << 20)
    assert info.keyslots[0].time_cost == 4
    assert info.keyslots[0].memory_kib == 32768
    assert info.keyslots[0].parallelism == 1

    assert run("volume", "info", path) == 0
    out = capsys.readouterr().out
    assert "aes-xts-plain64, 512-bit key" in out
    assert "Sector size:  4096 bytes" in out
    assert "Label:        db" in out
    assert "0: argon2id, time 4, memory 32768 KiB, 1 threads" in out

    assert run("volume", "info", "--json", path) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["uuid"] == info.uuid
    assert document["data_size"] == 2 << 20
    assert document["keyslots"][0]["kdf"] == "argon2id"


def test_create_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLUME_PASS", "from the environment")
    path = tmp_path / "vol.img"
    assert (
        run(
            "volume",
            "create",
            path,
            "--size",
            "4096",
            "--passphrase-env",
            "VOLUME_PASS",
            *FAST_FLAGS,
        )
        == 0
    )
    luks2.unlock(path, b"from the environment")


def test_create_from_stdin_strips_one_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"two lines\n\n"))
    path = tmp_path / "vol.img"
    assert run("volume", "create", path, "--size", "1M", "--passphrase-file", "-", *FAST_FLAGS) == 0
    luks2.unlock(path, b"two lines\n")
    with pytest.raises(luks2.Luks2Error):
        luks2.unlock(path, b"two lines")


def test_create_prompts_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["typed secret", "typed secret"])
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"", tty=True))
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    path = tmp_path / "vol.img"
    assert run("volume", "create", path, "--size", "1M", *FAST_FLAGS) == 0
    luks2.unlock(path, b"typed secret")


def test_create_prompt_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["typed secret", "typo secret"])
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"", tty=True))
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert run("volume", "create", tmp_path / "v", "--size", "1M", *FAST_FLAGS) == 1
    assert "storaged: error: passphrases do not match" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_no_passphrase_source_without_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"not read"))
    assert run("volume", "create", tmp_path / "v", "--size", "1M", *FAST_FLAGS) == 2
    assert capsys.readouterr().err.startswith("storaged: error: no passphrase source")
    assert not (tmp_path / "v").exists()


def test_passphrase_on_command_line_is_not_accepted(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        run("volume", "create", tmp_path / "v", "--size", "1M", "--passphrase", "oops")
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--passphrase-env", "NETBLK_TEST_UNSET_VARIABLE"], "is not set"),
        (["--passphrase-file", "/nonexistent/pass"], "cannot read passphrase file"),
    ],
)
def test_bad_passphrase_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert run("volume", "create", tmp_path / "v", "--size", "1M", *flags, *FAST_FLAGS) == 1
    assert message in capsys.readouterr().err


def test_empty_passphrase_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    assert run("volume", "create", tmp_path / "v", "--size", "1M", "--passphrase-file", empty) == 1
    assert "empty passphrase" in capsys.readouterr().err


def test_create_refuses_existing_file(
    volume: Path, pass_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = volume.read_bytes()[:4096]
    code = run(
        "volume", "create", volume, "--size", "1M", "--passphrase-file", pass_file, *FAST_FLAGS
    )
    assert code == 1
    assert "file exists" in capsys.readouterr().err
    assert volume.read_bytes()[:4096] == before


def test_forced_iterations_conflict_with_iter_time(
    tmp_path: Path, pass_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        "volume",
        "create",
        tmp_path / "v",
        "--size",
        "1M",
        "--passphrase-file",
        pass_file,
        "--iter-time",
        "100",
        *FAST_FLAGS,
    )
    assert code == 1
    assert "cannot be combined" in capsys.readouterr().err


def test_create_benchmarks_without_forced_iterations(tmp_path: Path, pass_file: Path) -> None:
    path = tmp_path / "vol.img"
    code = run(
        "volume",
        "create",
        path,
        "--size",
        "1M",
        "--passphrase-file",
        pass_file,
        "--iter-time",
        "50",
        "--pbkdf-memory",
        "8192",
        "--pbkdf-parallel",
        "1",
    )
    assert code == 0
    slot = luks2.read_info(path).keyslots[0]
    assert slot.memory_kib <= 8192
    assert slot.time_cost >= 4
    assert slot.parallelism == 1


@pytest.mark.parametrize("content", [b"not a volume" * 10000, b""])
def test_info_on_garbage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "junk"
    path.write_bytes(content)
    assert run("volume", "info", path) == 1
    err = capsys.readouterr().err
    assert err.startswith("storaged: error:")
    assert "Traceback" not in err


def test_info_on_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("volume", "info", tmp_path / "absent") == 1
    assert "No such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# add-passphrase / remove-passphrase
# ---------------------------------------------------------------------------


def test_add_then_remove_passphrase(
    volume: Path,
    pass_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = luks2.unlock(volume, PASSPHRASE)
    monkeypatch.setenv("NEW_PASS", "second passphrase")
    code = run(
        "volume",
        "add-passphrase",
        volume,
        "--passphrase-file",
        pass_file,
        "--new-passphrase-env",
        "NEW_PASS",
        *FAST_FLAGS,
    )
    assert code == 0
    assert "added keyslot 1" in capsys.readouterr().out
    assert luks2.unlock(volume, b"second passphrase") == key

    assert run("volume", "remove-passphrase", volume, "--passphrase-file", pass_file) == 0
    assert "removed keyslot 0" in capsys.readouterr().out
    assert luks2.read_info(volume).keyslot_ids == (1,)

    code = run("volume", "remove-passphrase", volume, "--passphrase-env", "NEW_PASS")
    assert code == 1
    assert "storaged: error: refusing to remove keyslot 1" in capsys.readouterr().err
    assert luks2.unlock(volume, b"second passphrase") == key


def test_add_passphrase_prompts_for_new(
    volume: Path, pass_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts: list[str] = []
    answers = iter(["prompted", "prompted"])

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(sys, "stdin", FakeStdin(b"", tty=True))
    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    code = run("volume", "add-passphrase", volume, "--passphrase-file", pass_file, *FAST_FLAGS)
    assert code == 0
    assert prompts == ["Enter new passphrase: ", "Verify passphrase: "]
    luks2.unlock(volume, b"prompted")


def test_add_passphrase_wrong_existing(
    volume: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WRONG", "wrong")
    monkeypatch.setenv("NEW_PASS", "new")
    code = run(
        "volume",
        "add-passphrase",
        volume,
        "--passphrase-env",
        "WRONG",
        "--new-passphrase-env",
        "NEW_PASS",
        *FAST_FLAGS,
    )
    assert code == 1
    assert "storaged: error: no keyslot matches this passphrase" in capsys.readouterr().err
    assert luks2.read_info(volume).keyslot_ids == (0,)


def test_add_passphrase_cannot_read_both_from_stdin(
    volume: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        "volume",
        "add-passphrase",
        volume,
        "--passphrase-file",
        "-",
        "--new-passphrase-file",
        "-",
        *FAST_FLAGS,
    )
    assert code == 2
    assert "only one passphrase can be read from stdin" in capsys.readouterr().err


def test_remove_passphrase_wrong(
    volume: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WRONG", "wrong")
    assert run("volume", "remove-passphrase", volume, "--passphrase-env", "WRONG") == 1
    assert "no keyslot matches" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# End to end: a real process, and cryptsetup
# ---------------------------------------------------------------------------


def test_errors_exit_without_traceback_in_a_real_process(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import argparse, sys
        from storaged import volume_cli
        parser = argparse.ArgumentParser(prog="storaged")
        volume_cli.register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(sys.argv[1:])
        sys.exit(args.func(args))
        """
    )
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 100)
    result = subprocess.run(
        [sys.executable, "-c", script, "volume", "info", str(junk)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("storaged: error:")
    assert "Traceback" not in result.stderr


@pytest.mark.cryptsetup
@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup not installed")
def test_cryptsetup_opens_cli_volume(volume: Path, tmp_path: Path) -> None:
    key = tmp_path / "raw-key"
    key.write_bytes(PASSPHRASE)
    ok = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(volume)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
