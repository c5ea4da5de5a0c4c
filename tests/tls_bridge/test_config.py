"""tls-bridge's config: a good file, the shipped example, and one clear
error per mistake, naming the key."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path

import pytest

from netblk.ktls import CIPHERS
from netblk.tomlconf import ConfigError
from tls_bridge.config import (
    DEFAULT_MAX_CONCURRENT,
    BridgeConfig,
    load_config,
    parse_config,
    read_token,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "tls-bridge/examples/tls-bridge.toml"
TOKEN = "t" * 32


def write_files(directory: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (directory / name).write_text("pem\n")
    (directory / "token").write_text(TOKEN + "\n")


def server(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "address": "127.0.0.1",
        "ca": "ca.pem",
        "cert": "client.pem",
        "key": "client.key",
        "token_file": "token",
    }
    return base | changes


def toml_value(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def render(servers: list[dict[str, object]], head: str = "") -> str:
    text = head
    for entry in servers:
        text += "[[servers]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in entry.items())
    return text


def load(tmp_path: Path, text: str) -> BridgeConfig:
    write_files(tmp_path)
    path = tmp_path / "tls-bridge.toml"
    path.write_text(text)
    return load_config(path)


def test_a_complete_config(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        render(
            [server(port=10911, server_name="storage.example"), server(address="::ffff:10.0.0.1")],
            '[log]\nformat = "text"\nlevel = "debug"\n[bridge]\nmax_concurrent = 4\n',
        ),
    )
    assert config.log_format == "text"
    assert config.log_level == "DEBUG"
    assert config.max_concurrent == 4
    first = config.server_for("127.0.0.1", 10911)
    assert first is not None
    assert first.verify_name == "storage.example"
    assert first.ca == tmp_path / "ca.pem"  # relative to the config file
    assert first.ciphersuites == tuple(CIPHERS)
    # The kernel may name an IPv4 peer either way; both find the entry.
    mapped = config.server_for("10.0.0.1", 10910)
    assert mapped is not None
    assert mapped is config.server_for("::ffff:10.0.0.1", 10910)
    assert mapped.verify_name == "10.0.0.1"
    assert config.server_for("127.0.0.1", 10910) is None
    assert config.server_for("not an ip", 10910) is None


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, render([server(address="2001:db8::1")]))
    assert config.max_concurrent == DEFAULT_MAX_CONCURRENT
    assert (config.log_format, config.log_level) == ("json", "INFO")
    entry = config.server_for("2001:db8:0::1", 10910)
    assert entry is not None
    assert entry.label == "[2001:db8::1]:10910"
    assert entry.address == ipaddress.ip_address("2001:db8::1")


def test_the_shipped_example_is_valid() -> None:
    config = parse_config(tomllib.loads(EXAMPLE.read_text()), EXAMPLE.parent)
    assert len(config.servers) == 2
    entry = config.server_for("192.0.2.10", 10910)
    assert entry is not None
    assert entry.verify_name == "storage.example.net"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "servers: at least one [[servers]] entry is required"),
        ("[logs]\n" + render([server()]), "config.logs: unknown setting"),
        (render([server(adress="x")]), "servers[0].adress: unknown setting"),
        (render([server(address="storage.example")]), "servers[0].address: expected an IP"),
        (render([server(port=0)]), "servers[0].port: must be 1..65535, got 0"),
        (render([server(port="10910")]), "servers[0].port: expected int, got '10910'"),
        (render([server(server_name="bad name!")]), "servers[0].server_name: not a host name"),
        (render([server(ciphersuites=["TLS_AES_128_CCM_SHA256"])]), "servers[0].ciphersuites:"),
        (render([server(ciphersuites=[])]), "servers[0].ciphersuites:"),
        (render([{k: v for k, v in server().items() if k != "key"}]), "servers[0].key: required"),
        (render([server(), server(address="127.0.0.1")]), "127.0.0.1:10910 is configured twice"),
        ('[log]\nformat = "xml"\n' + render([server()]), "log.format: expected 'json' or 'text'"),
        ('[log]\nlevel = "loud"\n' + render([server()]), "log.level: unknown level 'LOUD'"),
        ("[bridge]\nmax_concurrent = 0\n" + render([server()]), "bridge.max_concurrent: must be"),
        ("servers = 3\n", "config.servers: expected list, got 3"),
        ("[[servers]\n", "tls-bridge.toml: "),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path, text)


def test_missing_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^servers\[0\]\.cert: cannot read .*/missing.pem$"):
        load(tmp_path, render([server(cert="missing.pem")]))
    with pytest.raises(
        ConfigError, match=r"^servers\[0\]\.token_file: cannot read .*gone: No such"
    ):
        load(tmp_path, render([server(token_file="gone")]))
    with pytest.raises(ConfigError, match=r"^cannot read .*nope.toml: No such file"):
        load_config(tmp_path / "nope.toml")


def test_token_file_rules_and_no_token_in_messages(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(TOKEN.encode() + b"\r\n")
    assert read_token(path) == TOKEN.encode()
    path.write_text("short-secret\n")
    with pytest.raises(ValueError, match=r"token must be 16\.\.256 bytes, not 12") as info:
        read_token(path)
    assert "short-secret" not in str(info.value)
    with pytest.raises(ConfigError, match=r"servers\[0\]\.token_file: .*not 12"):
        load_config_with_token(tmp_path, "short-secret")


def load_config_with_token(tmp_path: Path, token: str) -> BridgeConfig:
    write_files(tmp_path)
    (tmp_path / "token").write_text(token + "\n")
    path = tmp_path / "tls-bridge.toml"
    path.write_text(render([server()]))
    return load_config(path)
