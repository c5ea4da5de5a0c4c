"""netblk-certs command line: files, messages, exit codes, and secrecy of tokens."""

from __future__ import annotations

import io
import ipaddress
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netblk.tokens import verify_token
from netblk_certs.cli import main
from netblk_certs.pki import make_ca, make_client_cert, write_issued
from tests import pki_fixtures
from tests.pki_fixtures import PkiFiles

CONSOLE_SCRIPT = Path(sys.executable).parent / "netblk-certs"
HASH_LINE_PREFIX = 'token_hash = "$argon2id$'
TOKEN = "an-operator-chosen-token-0123456789"

pki = pki_fixtures.pki  # registers the session fixture for this module


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    (attr,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attr.value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _hash_from(stdout: str) -> str:
    (line,) = [x for x in stdout.splitlines() if x.startswith("token_hash = ")]
    assert line.startswith(HASH_LINE_PREFIX)
    assert line.endswith('"')
    return line.removeprefix('token_hash = "').removesuffix('"')


def _assert_clean_error(err: str, fragment: str) -> None:
    assert err.startswith("netblk-certs: error: ")
    assert fragment in err
    assert "Traceback" not in err


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    assert main(["ca", "--dir", str(directory)]) == 0
    return directory


# --- ca / server / client -------------------------------------------------------------------


def test_ca_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"
    assert main(["ca", "--dir", str(directory), "--cn", "Test CA", "--days", "30"]) == 0
    cert = _cert(directory / "ca.crt")
    assert _cn(cert) == "Test CA"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    assert _mode(directory / "ca.key") == 0o600
    assert _mode(directory / "ca.crt") == 0o644
    assert _mode(directory) == 0o700
    assert str(directory / "ca.key") in capsys.readouterr().err


def test_ca_refuses_overwrite_then_force(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    before = (ca_dir / "ca.key").read_bytes()
    assert main(["ca", "--dir", str(ca_dir)]) == 1
    _assert_clean_error(capsys.readouterr().err, "--force")
    assert (ca_dir / "ca.key").read_bytes() == before
    assert main(["ca", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "ca.key").read_bytes() != before


def test_server_cert(ca_dir: Path) -> None:
    argv = ["server", "--dir", str(ca_dir), "--name", "storaged", "--dns", "localhost"]
    argv += ["--dns", "storage.example", "--ip", "127.0.0.1", "::1"]
    assert main(argv) == 0
    cert = _cert(ca_dir / "server.crt")
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    assert _cn(cert) == "storaged"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "storage.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert _mode(ca_dir / "server.key") == 0o600


def test_server_cert_out_dir(ca_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "storaged-conf"
    argv = ["server", "--dir", str(ca_dir), "--name", "s", "--ip", "10.1.2.3"]
    assert main([*argv, "--out-dir", str(out_dir), "--days", "7"]) == 0
    cert = _cert(out_dir / "server.crt")
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 7
    assert _mode(out_dir / "server.key") == 0o600
    assert not (ca_dir / "server.crt").exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ([], "at least one DNS name or IP address"),
        (["--ip", "999.1.1.1"], "invalid IP address '999.1.1.1'"),
        (["--dns", "bad name"], "invalid DNS name"),
    ],
    ids=["no-san", "bad-ip", "bad-dns"],
)
def test_server_cert_bad_input(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str
) -> None:
    capsys.readouterr()
    assert main(["server", "--dir", str(ca_dir), "--name", "s", *extra]) == 1
    _assert_clean_error(capsys.readouterr().err, fragment)
    assert not (ca_dir / "server.key").exists()


def test_server_cert_without_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--dir", str(tmp_path), "--name", "s", "--dns", "localhost"]) == 1
    _assert_clean_error(capsys.readouterr().err, "ca.key")


def test_client_cert(ca_dir: Path) -> None:
    assert main(["client", "alice", "--dir", str(ca_dir)]) == 0
    cert = _cert(ca_dir / "client-alice.crt")
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    assert _cn(cert) == "alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _mode(ca_dir / "client-alice.key") == 0o600
    assert _mode(ca_dir / "client-alice.crt") == 0o644


def test_client_cert_refuses_overwrite(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "alice", "--dir", str(ca_dir)]) == 0
    capsys.readouterr()
    assert main(["client", "alice", "--dir", str(ca_dir)]) == 1
    _assert_clean_error(capsys.readouterr().err, "client-alice.key")


@pytest.mark.parametrize("name", ["-x", "../evil", "a b", "a" * 65])
def test_client_cert_bad_name(ca_dir: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    capsys.readouterr()
    assert main(["client", "--dir", str(ca_dir), "--", name]) == 1
    _assert_clean_error(capsys.readouterr().err, "client name")
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]


# --- token / hash-token ---------------------------------------------------------------------


def test_token_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token"]) == 0
    out, err = capsys.readouterr()
    token = out.splitlines()[0]
    assert verify_token(_hash_from(out), token)
    assert "token_hash" in err
    assert token not in err


def test_token_to_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "alice.token"
    assert main(["token", "--out", str(out_file)]) == 0
    out, err = capsys.readouterr()
    token = out_file.read_text().strip()
    assert _mode(out_file) == 0o600
    assert token not in out
    assert token not in err
    assert str(out_file) in err
    assert verify_token(_hash_from(out), token)


def test_token_file_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "alice.token"
    out_file.write_text("precious\n")
    assert main(["token", "--out", str(out_file)]) == 1
    _assert_clean_error(capsys.readouterr().err, "refusing to overwrite")
    assert out_file.read_text() == "precious\n"


def test_hash_token_from_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "t"
    token_file.write_text(TOKEN + "\n")
    assert main(["hash-token", "--token-file", str(token_file)]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out
    assert TOKEN not in err
    assert verify_token(_hash_from(out), TOKEN)


def test_hash_token_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NETBLK_TEST_TOKEN", TOKEN)
    assert main(["hash-token", "--token-env", "NETBLK_TEST_TOKEN"]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert verify_token(_hash_from(out), TOKEN)


def test_hash_token_missing_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NETBLK_TEST_TOKEN", raising=False)
    assert main(["hash-token", "--token-env", "NETBLK_TEST_TOKEN"]) == 1
    _assert_clean_error(capsys.readouterr().err, "NETBLK_TEST_TOKEN")


def test_hash_token_too_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("short\n")
    assert main(["hash-token", "--token-file", str(token_file)]) == 1
    _assert_clean_error(capsys.readouterr().err, "token must be 16-256 bytes")


def test_hash_token_no_source_without_tty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN))
    assert main(["hash-token"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_clean_error(err, "no token source")


def test_hash_token_prompts_on_tty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter([TOKEN, TOKEN])
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert main(["hash-token"]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert verify_token(_hash_from(out), TOKEN)


def test_hash_token_prompt_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter([TOKEN, TOKEN + "typo"])
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert main(["hash-token"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    _assert_clean_error(err, "do not match")


def test_hash_token_refuses_token_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-token", TOKEN]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "unrecognized arguments" in err


# --- show -----------------------------------------------------------------------------------


def test_show(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["server", "--dir", str(ca_dir), "--name", "storaged", "--dns", "localhost"]
    assert main([*argv, "--ip", "::1"]) == 0
    capsys.readouterr()
    assert main(["show", str(ca_dir / "server.crt")]) == 0
    out = capsys.readouterr().out
    fingerprint = _cert(ca_dir / "server.crt").fingerprint(hashes.SHA256()).hex(":").upper()
    assert "subject:     CN=storaged" in out
    assert "issuer:      CN=netblk CA" in out
    assert "DNS:localhost, IP:::1" in out
    assert "(valid now)" in out
    assert fingerprint in out


def test_show_expired(pki: PkiFiles, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(pki.expired_cert)]) == 0
    out = capsys.readouterr().out
    assert "subject:     CN=alice" in out
    assert "(EXPIRED)" in out


def test_show_not_yet_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = datetime.now(UTC) + timedelta(days=1)
    future = make_client_cert(make_ca(), "carol", not_before=start)
    _, cert_path = write_issued(future, tmp_path, "carol")
    assert main(["show", str(cert_path)]) == 0
    assert "(NOT YET VALID)" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"not a certificate", None], ids=["garbage", "missing"])
def test_show_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None
) -> None:
    path = tmp_path / "x.crt"
    if content is not None:
        path.write_bytes(content)
    assert main(["show", str(path)]) == 1
    _assert_clean_error(capsys.readouterr().err, str(path))


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "hash-token" in capsys.readouterr().out


# --- the installed entry points -------------------------------------------------------------


def test_console_script_end_to_end(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    env = {**os.environ, "NETBLK_TEST_TOKEN": TOKEN}
    steps = [
        ["ca", "--dir", str(directory)],
        ["client", "bob", "--dir", str(directory)],
        ["hash-token", "--token-env", "NETBLK_TEST_TOKEN"],
    ]
    results = [
        subprocess.run(
            [str(CONSOLE_SCRIPT), *step],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        for step in steps
    ]
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert _cn(_cert(directory / "client-bob.crt")) == "bob"
    assert verify_token(_hash_from(results[2].stdout), TOKEN)
    again = subprocess.run(
        [str(CONSOLE_SCRIPT), "ca", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 1
    _assert_clean_error(again.stderr, "refusing to overwrite")


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "netblk_certs", "hash-token"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    _assert_clean_error(result.stderr, "no token source")


@pytest.mark.parametrize("days", ["100000000", "2914000", "-1", "0", "x", "1e3", ""])
@pytest.mark.parametrize("kind", ["ca", "server", "client"])
def test_a_validity_x509_cannot_say_is_a_one_line_error(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, days: str
) -> None:
    """Beyond 9999-12-31 (X.509's last date) or below a day: exit 1 and a
    line saying so; not a number: argparse's usage error, exit 2."""
    argv = {
        "ca": ["ca", "--dir", str(tmp_path / "other")],
        "server": ["server", "--dir", str(ca_dir), "--name", "s", "--ip", "127.0.0.1", "--force"],
        "client": ["client", "bob", "--dir", str(ca_dir), "--force"],
    }[kind]
    if days.lstrip("-").isdigit():
        assert main([*argv, "--days", days]) == 1
        _assert_clean_error(capsys.readouterr().err, "days must be")
        return
    assert main([*argv, "--days", days]) == 2
    err = capsys.readouterr().err
    assert "argument --days: invalid int value" in err
    assert "Traceback" not in err
