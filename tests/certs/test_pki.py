"""netblk_certs.pki: certificate contents, chain verification, files, and a real mTLS handshake."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from netblk.protocol.names import validate_client_name
from netblk_certs.pki import (
    Issued,
    load_issued,
    make_ca,
    make_client_cert,
    make_server_cert,
    write_issued,
)
from tests import pki_fixtures
from tests.pki_fixtures import PkiFiles

pki = pki_fixtures.pki  # registers the session fixture for this module

IO_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca()


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[_Ext]) -> x509.Extension[_Ext]:
    return cert.extensions.get_extension_for_class(kind)


def _cn(cert: x509.Certificate) -> str:
    (attr,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attr.value)


# --- certificate contents -------------------------------------------------------------------


def test_ca_extensions(ca: Issued) -> None:
    cert = ca.cert
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert _cn(cert) == "netblk CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert _ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    )


def test_ca_days() -> None:
    cert = make_ca("other", days=10).cert
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=10)
    # backdated a little for peers with slow clocks, but not in the future
    assert cert.not_valid_before_utc <= datetime.now(UTC)


def test_server_cert_contents(ca: Issued) -> None:
    server = make_server_cert(
        ca, "storaged", dns_names=["localhost", "*.example.net"], ip_addresses=["10.0.0.1", "::1"]
    )
    cert = server.cert
    cert.verify_directly_issued_by(ca.cert)
    assert _cn(cert) == "storaged"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "*.example.net"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.IPv4Address("10.0.0.1"),
        ipaddress.IPv6Address("::1"),
    ]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not _ext(cert, x509.BasicConstraints).value.ca
    ski = _ext(ca.cert, x509.SubjectKeyIdentifier).value
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert _ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(server.key.public_key())
    )


def test_server_cert_needs_a_san(ca: Issued) -> None:
    with pytest.raises(ValueError, match="at least one DNS name or IP address"):
        make_server_cert(ca, "storaged")


@pytest.mark.parametrize("bad", ["300.1.1.1", "localhost", "::g", "fe80::1%eth0", ""])
def test_server_cert_rejects_bad_ip(ca: Issued, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid IP address"):
        make_server_cert(ca, "storaged", ip_addresses=[bad])


@pytest.mark.parametrize("bad", ["", "a..b", "-a.example", "a b", "host.", "*", "ex*mple.com"])
def test_server_cert_rejects_bad_dns_name(ca: Issued, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid DNS name"):
        make_server_cert(ca, "storaged", dns_names=[bad])


def test_client_cert_contents(ca: Issued) -> None:
    cert = make_client_cert(ca, "alice").cert
    cert.verify_directly_issued_by(ca.cert)
    assert _cn(cert) == "alice"
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _ext(cert, x509.KeyUsage).value.digital_signature
    assert not _ext(cert, x509.BasicConstraints).value.ca


@pytest.mark.parametrize("name", ["a", "A" * 64, "node-1.rack_2", "_svc", "0"])
def test_client_name_accepted(ca: Issued, name: str) -> None:
    assert validate_client_name(name) == name
    assert _cn(make_client_cert(ca, name).cert) == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-opt", "a" * 65, "a b", "a/b", "é", "alice\n", "a:b"]
)
def test_client_name_rejected(ca: Issued, name: str) -> None:
    with pytest.raises(ValueError):
        validate_client_name(name)
    with pytest.raises(ValueError, match="client name"):
        make_client_cert(ca, name)


def test_explicit_validity_window(ca: Issued) -> None:
    start = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    end = start + timedelta(hours=1)
    cert = make_client_cert(ca, "alice", not_before=start, not_after=end).cert
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == end
    only_start = make_client_cert(ca, "alice", not_before=start, days=2).cert
    assert only_start.not_valid_after_utc == start + timedelta(days=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 0}, "days must be at least 1"),
        (
            {"not_before": datetime(2030, 1, 1, tzinfo=UTC), "not_after": datetime(2029, 1, 1)},
            "no timezone",
        ),
        (
            {
                "not_before": datetime(2030, 1, 1, tzinfo=UTC),
                "not_after": datetime(2030, 1, 1, tzinfo=UTC),
            },
            "must be later",
        ),
    ],
)
def test_bad_validity_rejected(ca: Issued, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_client_cert(ca, "alice", **kwargs)  # type: ignore[arg-type]


def test_leaf_cannot_sign(ca: Issued) -> None:
    leaf = make_client_cert(ca, "alice")
    with pytest.raises(ValueError, match="not a CA certificate"):
        make_client_cert(leaf, "bob")


# --- chain verification (cryptography's WebPKI verifier) ------------------------------------


def _builder(ca_cert: Path) -> PolicyBuilder:
    return PolicyBuilder().store(Store([_cert(ca_cert)]))


def _client_verifier_builder(ca_cert: Path) -> PolicyBuilder:
    """WebPKI defaults, except that a client cert may lack a SAN: its identity is the CN."""
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    return _builder(ca_cert).extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy
    )


@pytest.mark.parametrize(
    "subject",
    [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ],
    ids=["dns", "ipv4", "ipv6"],
)
def test_server_chain_verifies(pki: PkiFiles, subject: x509.DNSName | x509.IPAddress) -> None:
    leaf = _cert(pki.server_cert)
    chain = _builder(pki.ca_cert).build_server_verifier(subject).verify(leaf, [])
    assert chain == [leaf, _cert(pki.ca_cert)]


@pytest.mark.parametrize(
    "subject",
    [x509.DNSName("storaged.example"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.2"))],
    ids=["dns", "ip"],
)
def test_server_chain_wrong_name(pki: PkiFiles, subject: x509.DNSName | x509.IPAddress) -> None:
    verifier = _builder(pki.ca_cert).build_server_verifier(subject)
    with pytest.raises(VerificationError):
        verifier.verify(_cert(pki.server_cert), [])


def test_client_chain_verifies(pki: PkiFiles) -> None:
    leaf = _cert(pki.alice_cert)
    verified = _client_verifier_builder(pki.ca_cert).build_client_verifier().verify(leaf, [])
    assert verified.chain == [leaf, _cert(pki.ca_cert)]
    assert _cn(verified.chain[0]) == "alice"


@pytest.mark.parametrize(
    "which",
    ["rogue_cert", "expired_cert", "server_cert"],
    ids=["other-ca", "expired", "server-eku"],
)
def test_client_chain_rejected(pki: PkiFiles, which: str) -> None:
    verifier = _client_verifier_builder(pki.ca_cert).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(_cert(getattr(pki, which)), [])


def test_not_yet_valid_client(ca: Issued, tmp_path: Path) -> None:
    start = datetime.now(UTC) + timedelta(days=1)
    leaf = make_client_cert(ca, "alice", not_before=start, days=5).cert
    _, ca_cert = write_issued(ca, tmp_path, "ca")
    builder = _client_verifier_builder(ca_cert)
    with pytest.raises(VerificationError):
        builder.build_client_verifier().verify(leaf, [])
    later = builder.time(start + timedelta(hours=1)).build_client_verifier()
    assert later.verify(leaf, []).chain[0] == leaf


# --- files ----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Prove the file modes come from the code, not from a restrictive umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_write_issued_modes(ca: Issued, tmp_path: Path) -> None:
    directory = tmp_path / "new" / "pki"
    key_path, cert_path = write_issued(ca, directory, "ca")
    assert (key_path, cert_path) == (directory / "ca.key", directory / "ca.crt")
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) == 0o644
    assert _mode(directory) == 0o700
    assert key_path.read_bytes() == ca.key_pem()
    assert cert_path.read_bytes() == ca.cert_pem()
    assert b"BEGIN PRIVATE KEY" in ca.key_pem()  # PKCS#8, unencrypted


def test_write_issued_refuses_overwrite(ca: Issued, tmp_path: Path) -> None:
    write_issued(ca, tmp_path, "ca")
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_issued(make_ca(), tmp_path, "ca")
    assert (tmp_path / "ca.key").read_bytes() == before


def test_write_issued_checks_both_files_first(ca: Issued, tmp_path: Path) -> None:
    (tmp_path / "x.crt").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"x\.crt"):
        write_issued(ca, tmp_path, "x")
    assert not (tmp_path / "x.key").exists()
    assert (tmp_path / "x.crt").read_bytes() == b"keep me"


def test_write_issued_refuses_dangling_symlink(ca: Issued, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "ca.key").symlink_to(target)
    with pytest.raises(FileExistsError):
        write_issued(ca, tmp_path, "ca")
    assert not target.exists()


@pytest.mark.usefixtures("permissive_umask")
def test_write_issued_force_replaces(ca: Issued, tmp_path: Path) -> None:
    key_path, cert_path = write_issued(make_ca(), tmp_path, "ca")
    key_path.chmod(0o666)
    write_issued(ca, tmp_path, "ca", force=True)
    assert key_path.read_bytes() == ca.key_pem()
    assert cert_path.read_bytes() == ca.cert_pem()
    assert _mode(key_path) == 0o600


def test_load_issued_round_trip(ca: Issued, tmp_path: Path) -> None:
    key_path, cert_path = write_issued(ca, tmp_path, "ca")
    loaded = load_issued(key_path, cert_path)
    assert loaded.cert == ca.cert
    assert loaded.key.private_numbers() == ca.key.private_numbers()


def test_load_issued_rejects_mismatched_pair(ca: Issued, tmp_path: Path) -> None:
    write_issued(ca, tmp_path, "ca")
    other_key, _ = write_issued(make_ca(), tmp_path, "other")
    with pytest.raises(ValueError, match="does not match"):
        load_issued(other_key, tmp_path / "ca.crt")


@pytest.mark.parametrize(
    ("key_pem", "message"),
    [
        (b"garbage", "not a readable PEM private key"),
        (
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "expected an EC private key",
        ),
        (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ),
            "encrypted private keys are not supported",
        ),
    ],
    ids=["garbage", "ed25519", "encrypted"],
)
def test_load_issued_rejects_bad_keys(
    ca: Issued, tmp_path: Path, key_pem: bytes, message: str
) -> None:
    _, cert_path = write_issued(ca, tmp_path, "ca")
    bad_key = tmp_path / "bad.key"
    bad_key.write_bytes(key_pem)
    with pytest.raises(ValueError, match=message):
        load_issued(bad_key, cert_path)


def test_load_issued_rejects_bad_cert(ca: Issued, tmp_path: Path) -> None:
    key_path, cert_path = write_issued(ca, tmp_path, "ca")
    cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="not a readable PEM certificate"):
        load_issued(key_path, cert_path)


# --- a real mutual-TLS 1.3 handshake ---------------------------------------------------------


@dataclass(frozen=True)
class ServerSide:
    """What the storaged-like server saw: the verified peer CN, or why it refused."""

    peer_cn: str | None = None
    version: str | None = None
    error: Exception | None = None


def _server_context(pki: PkiFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no post-handshake messages, as kTLS needs
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(pki.ca_cert)
    return ctx


def _client_context(pki: PkiFiles, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server cert and its name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki.ca_cert)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _serve_once(listener: socket.socket, ctx: ssl.SSLContext) -> ServerSide:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(IO_TIMEOUT)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                assert peer is not None
                cn = _cn(x509.load_der_x509_certificate(peer))
                tls.sendall(f"hello {cn}".encode())
                return ServerSide(peer_cn=cn, version=tls.version())
        except (ssl.SSLError, OSError) as exc:
            return ServerSide(error=exc)


def _connect(port: int, ctx: ssl.SSLContext, server_hostname: str) -> bytes | Exception:
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            return tls.recv(64)
    except (ssl.SSLError, OSError) as exc:
        return exc


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "localhost"
) -> tuple[ServerSide, bytes | Exception]:
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        listener.settimeout(IO_TIMEOUT)
        server = pool.submit(_serve_once, listener, server_ctx)
        client = _connect(listener.getsockname()[1], client_ctx, server_hostname)
        return server.result(timeout=IO_TIMEOUT), client


def _refused(client: bytes | Exception) -> bool:
    """In TLS 1.3 the client learns of its rejection only on its first read: error or EOF."""
    return isinstance(client, Exception) or client == b""


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_mtls_handshake(pki: PkiFiles, server_hostname: str) -> None:
    client_ctx = _client_context(pki, pki.alice_cert, pki.alice_key)
    server, client = _handshake(_server_context(pki), client_ctx, server_hostname)
    assert server == ServerSide(peer_cn="alice", version="TLSv1.3")
    assert client == b"hello alice"


def test_mtls_second_client_identity(pki: PkiFiles) -> None:
    server, client = _handshake(
        _server_context(pki), _client_context(pki, pki.bob_cert, pki.bob_key)
    )
    assert server.peer_cn == "bob"
    assert client == b"hello bob"


@pytest.mark.parametrize(
    ("cert", "key", "reason"),
    [
        ("expired_cert", "expired_key", "expired"),
        ("rogue_cert", "rogue_key", "unable to get local issuer"),
    ],
    ids=["expired", "other-ca"],
)
def test_mtls_rejects_bad_client_cert(pki: PkiFiles, cert: str, key: str, reason: str) -> None:
    client_ctx = _client_context(pki, getattr(pki, cert), getattr(pki, key))
    server, client = _handshake(_server_context(pki), client_ctx)
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert reason in server.error.verify_message
    assert server.peer_cn is None
    assert _refused(client)


def test_mtls_requires_client_cert(pki: PkiFiles) -> None:
    server, client = _handshake(_server_context(pki), _client_context(pki, None, None))
    assert isinstance(server.error, ssl.SSLError)
    assert server.peer_cn is None
    assert _refused(client)


def test_mtls_client_checks_server_name(pki: PkiFiles) -> None:
    client_ctx = _client_context(pki, pki.alice_cert, pki.alice_key)
    server, client = _handshake(_server_context(pki), client_ctx, "storaged.example")
    assert isinstance(client, ssl.SSLCertVerificationError)
    assert server.peer_cn is None
