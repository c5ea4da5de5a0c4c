"""The admin API's config: a complete file, the defaults, the shipped
example, and one clear error per mistake, naming the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from netblk.tomlconf import ConfigError
from netblk_admin.config import (
    DEFAULT_LISTEN,
    DEFAULT_PORT,
    DEFAULT_SYSFS_ROOT,
    ApiConfig,
    load_config,
    parse_config,
)
from tests.admin_api.conftest import TOKENS

EXAMPLE = Path(__file__).resolve().parents[2] / "admin-api/examples/admin-api.toml"
HASH = TOKENS["ops"]
TOKEN_TABLE = f'[tokens.ops]\ntoken_hash = "{HASH}"\n'


def load(tmp_path: Path, text: str) -> ApiConfig:
    path = tmp_path / "admin-api.toml"
    path.write_text(text)
    return load_config(path)


def test_a_complete_config(tmp_path: Path) -> None:
    (tmp_path / "api.crt").write_text("pem\n")
    (tmp_path / "api.key").write_text("pem\n")
    config = load(
        tmp_path,
        '[api]\nlisten = "::1"\nport = 8443\nsysfs_root = "fake-sys"\n'
        '[tls]\ncert = "api.crt"\nkey = "api.key"\n'
        '[log]\nformat = "text"\nlevel = "debug"\n'
        + TOKEN_TABLE
        + f'[tokens.monitoring]\ntoken_hash = "{TOKENS["monitoring"]}"\n',
    )
    assert (config.listen, config.port) == ("::1", 8443)
    assert config.sysfs_root == tmp_path / "fake-sys"  # relative to the config file
    assert config.tls is not None
    assert config.tls.cert == tmp_path / "api.crt"
    assert (config.log_format, config.log_level) == ("text", "DEBUG")
    assert config.tokens == TOKENS
    assert config.loopback_only


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, TOKEN_TABLE)
    assert (config.listen, config.port, config.sysfs_root) == (
        DEFAULT_LISTEN,
        DEFAULT_PORT,
        DEFAULT_SYSFS_ROOT,
    )
    assert config.tls is None
    assert config.loopback_only
    assert not load(tmp_path, '[api]\nlisten = "0.0.0.0"\n' + TOKEN_TABLE).loopback_only


def test_the_shipped_example_is_valid() -> None:
    config = parse_config(tomllib.loads(EXAMPLE.read_text()), EXAMPLE.parent)
    assert config.listen == "127.0.0.1"
    assert list(config.tokens) == ["ops"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "tokens: at least one [tokens.NAME] with a token_hash is required"),
        ("[api]\nport = 0\n" + TOKEN_TABLE, "api.port: must be 1..65535, got 0"),
        ('[api]\nport = "80"\n' + TOKEN_TABLE, "api.port: expected int, got '80'"),
        ('[api]\nlisten = "localhost"\n' + TOKEN_TABLE, "api.listen: expected an IP address"),
        ("[api]\nlisten = true\n" + TOKEN_TABLE, "api.listen: expected str, got True"),
        ('[api]\nsysfs = "/sys"\n' + TOKEN_TABLE, "api.sysfs: unknown setting"),
        ("[apis]\n" + TOKEN_TABLE, "config.apis: unknown setting"),
        ('[tls]\ncert = "a.crt"\n' + TOKEN_TABLE, "tls.key: required"),
        ('[log]\nformat = "xml"\n' + TOKEN_TABLE, "log.format: expected 'json' or 'text'"),
        ('[log]\nlevel = "loud"\n' + TOKEN_TABLE, "log.level: unknown level 'LOUD'"),
        ('[tokens.ops]\ntoken_hash = "hunter2"\n', "tokens.ops.token_hash: expected an argon2id"),
        (
            '[tokens.ops]\ntoken_hash = "' + HASH.replace("argon2id", "argon2i") + '"\n',
            "tokens.ops.token_hash: expected an argon2id",
        ),
        ("[tokens.ops]\n", "tokens.ops.token_hash: required"),
        (TOKEN_TABLE + "hash = 1\n", "tokens.ops.hash: unknown setting"),
        (f'[tokens."../x"]\ntoken_hash = "{HASH}"\n', "tokens.../x: token name '../x' may hold"),
        ('tokens = "x"\n', "config.tokens: expected dict, got 'x'"),
        ("[api\n", "admin-api.toml: "),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path, text)


def test_tls_files_must_be_readable(tmp_path: Path) -> None:
    (tmp_path / "api.crt").write_text("pem\n")
    with pytest.raises(ConfigError, match=r"^tls\.key: cannot read .*/missing\.key$"):
        load(tmp_path, '[tls]\ncert = "api.crt"\nkey = "missing.key"\n' + TOKEN_TABLE)
    with pytest.raises(ConfigError, match=r"^cannot read .*nope\.toml: No such file"):
        load_config(tmp_path / "nope.toml")
