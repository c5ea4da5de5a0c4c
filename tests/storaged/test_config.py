"""Config parsing: good files load, every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from netblk.tomlconf import ConfigError
from storaged.config import Access, RbdImage, load_config, parse_size

HASH = "$argon2id$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
BASE = f"""
[server]
listen = ["127.0.0.1", "::1"]
port = 10999
[tls]
cert = "server.crt"
key = "server.key"
ca = "ca.crt"
[cache]
size = "16MiB"
[clients.alice]
token_hash = "{HASH}"
[exports.data]
volume = "data.luks"
passphrase_env = "DATA_PASS"
[exports.data.access]
alice = "rw"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "storaged.toml"
    path.write_text(text)
    return path


def test_full_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert load_config(write(tmp_path, BASE.replace('[cache]\nsize = "16MiB"\n', ""))).notices == ()
    assert config.listen == ("127.0.0.1", "::1")
    assert config.port == 10999
    assert config.tls.cert == tmp_path / "server.crt"
    assert config.tls.kernel_tls
    assert config.notices == (
        "cache.size is ignored: storaged keeps no cache of decrypted sectors "
        "(the page cache holds the ciphertext; docs/performance.md)",
    )
    assert config.exports["data"].volume == tmp_path / "data.luks"
    assert config.exports["data"].access == {"alice": Access.RW}
    assert config.clients["alice"].token_hash == HASH


def test_an_export_on_an_rbd_image(tmp_path: Path) -> None:
    text = BASE.replace(
        'volume = "data.luks"',
        'rbd = { pool = "netblk", image = "data", client = "client.storaged",'
        ' keyring = "ceph/keyring" }',
    )
    volume = load_config(write(tmp_path, text)).exports["data"].volume
    assert volume == RbdImage(
        pool="netblk",
        image="data",
        conf=Path("/etc/ceph/ceph.conf"),
        client="storaged",
        keyring=tmp_path / "ceph" / "keyring",
    )
    assert str(volume) == "rbd:netblk/data"


def test_kernel_tls_can_be_turned_off(tmp_path: Path) -> None:
    text = BASE.replace('ca = "ca.crt"', 'ca = "ca.crt"\nkernel_tls = false')
    assert not load_config(write(tmp_path, text)).tls.kernel_tls


def test_cli_overrides_win(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, BASE),
        {"tls_cert": Path("/x/c.pem"), "port": 12345, "listen": ("::",), "tls_key": None},
    )
    assert config.tls.cert == Path("/x/c.pem")
    assert config.tls.key == tmp_path / "server.key"
    assert (config.port, config.listen) == (12345, ("::",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("port = 10999", "port = 70000"), "server.port: must be 1..65535"),
        (("port = 10999", 'port = "x"'), "server.port: expected int"),
        (('size = "16MiB"', 'size = "lots"'), "cache.size: expected a size"),
        (('alice = "rw"', 'alice = "admin"'), "exports.data.access.alice: expected 'rw'"),
        (('alice = "rw"', 'carol = "rw"'), "exports.data.access.carol: unknown client"),
        (('passphrase_env = "DATA_PASS"', ""), "set exactly one of passphrase_file"),
        (("[exports.data]", "[exports.'../x']"), "exports.../x: export name"),
        ((f'token_hash = "{HASH}"', 'token_hash = "plain"'), "expected an argon2id hash"),
        (('cert = "server.crt"', 'cert = "server.crt"\nciphers = "x"'), "tls.ciphers: unknown"),
        (('ca = "ca.crt"', ""), "tls.ca: required"),
        (('ca = "ca.crt"', 'ca = "ca.crt"\nkernel_tls = 1'), "tls.kernel_tls: expected bool"),
        (("[server]", "[server]\nmax_inflight = 0"), "server.max_inflight: must be positive"),
        (("[server]", '[server]\nmax_payload = "2MiB"'), "server.max_payload: must be"),
        (("[server]", "[server]\nmax_inflight_bytes = 4096"), "server.max_inflight_bytes"),
        (("[server]", "[server]\nmax_connections = 0"), "server.max_connections: must be"),
        (
            ("[server]", '[server]\nmax_connections_per_client = "8"'),
            "server.max_connections_per_client: expected int",
        ),
        (("[server]", "[login]\nmax_pending = -1\n[server]"), "login.max_pending: must be"),
        (
            ("[server]", "[login]\nmax_pending_per_peer = 1.5\n[server]"),
            "login.max_pending_per_peer: expected int",
        ),
        (('volume = "data.luks"', ""), "exports.data: set exactly one of volume or rbd"),
        (
            ('volume = "data.luks"', 'volume = "data.luks"\nrbd = { pool = "p" }'),
            "exports.data: set exactly one of volume or rbd",
        ),
        (('volume = "data.luks"', 'rbd = { pool = "p", image = "i" }'), "exports.data.rbd.client"),
        (
            ('volume = "data.luks"', 'rbd = { pool = "", image = "i", client = "c" }'),
            "exports.data.rbd.pool: must not be empty",
        ),
        (
            ('volume = "data.luks"', 'rbd = { pool = "p", image = "i", client = "c", x = 1 }'),
            "exports.data.rbd.x: unknown setting",
        ),
    ],
)
def test_mistakes_name_their_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in BASE
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, BASE.replace(old, new, 1)))
    assert message in str(caught.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"storaged\.toml"):
        load_config(write(tmp_path, "[server\n"))


@pytest.mark.parametrize(
    ("raw", "size"), [(4096, 4096), ("64M", 64 << 20), ("64MiB", 64 << 20), ("1G", 1 << 30)]
)
def test_sizes(raw: object, size: int) -> None:
    assert parse_size(raw, "k") == size


@pytest.mark.parametrize("raw", [-1, "1.5G", "ten", True, None])
def test_bad_sizes(raw: object) -> None:
    with pytest.raises(ConfigError, match="k: expected a size"):
        parse_size(raw, "k")
