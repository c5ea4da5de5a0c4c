"""Minimal PKI for netblk: one CA, server certificates and client certificates.

Every certificate is ECDSA P-256 / SHA-256 and carries the extensions that
strict verifiers (OpenSSL, the WebPKI profile of ``cryptography.x509.verification``)
expect, so the same files work for storaged, tls-bridge and the tests.
A client's identity is its subject CommonName; storaged matches it against
its configured clients.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netblk.protocol.names import validate_client_name

CURVE = ec.SECP256R1()
SIGNATURE_HASH = hashes.SHA256()
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825
# Backdate notBefore so a peer whose clock is slightly behind accepts a fresh cert.
CLOCK_SKEW = timedelta(minutes=5)

KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644
DIR_MODE = 0o700

# A client name becomes a CN, a file name (client-NAME.crt) and a config key,
# so it is kept to a conservative, shell- and path-safe alphabet.
# One LDH label; a DNS SAN may additionally start with a "*." wildcard label.
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MAX_DNS_NAME_LEN = 253
MAX_COMMON_NAME_LEN = 64  # RFC 5280 ub-common-name


@dataclass(frozen=True)
class Issued:
    """A private key and the certificate issued for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def key_pem(self) -> bytes:
        """Return the key as unencrypted PKCS#8 PEM (protected by file mode, not a passphrase)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert_pem(self) -> bytes:
        """Return the certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "netblk CA", *, days: int = DEFAULT_CA_DAYS) -> Issued:
    """Create a self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(CURVE)
    name = _cn_name(common_name)
    not_before, not_after = _validity(days, None, None)
    cert = (
        _base_builder(name, name, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, SIGNATURE_HASH)
    )
    return Issued(key=key, cert=cert)


def make_server_cert(
    ca: Issued,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """Issue a serverAuth certificate; clients verify the SANs, never the CN."""
    sans: list[x509.GeneralName] = [x509.DNSName(_check_dns_name(n)) for n in dns_names]
    sans += [x509.IPAddress(_parse_ip(a)) for a in ip_addresses]
    if not sans:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    return _issue_leaf(
        ca,
        common_name,
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.SubjectAlternativeName(sans),
        days,
        not_before,
        not_after,
    )


def make_client_cert(
    ca: Issued,
    client_name: str,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """Issue a clientAuth certificate whose subject CN is the client's identity."""
    validate_client_name(client_name)
    return _issue_leaf(
        ca, client_name, ExtendedKeyUsageOID.CLIENT_AUTH, None, days, not_before, not_after
    )


def load_issued(key_path: Path, cert_path: Path) -> Issued:
    """Load a PEM key and certificate and check that they belong together."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except TypeError as exc:  # raised for a passphrase-protected key
        raise ValueError(f"{key_path}: encrypted private keys are not supported") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{key_path}: not a readable PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: expected an EC private key, got {type(key).__name__}")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{cert_path}: not a readable PEM certificate") from exc
    if cert.public_key() != key.public_key():
        raise ValueError(f"{key_path} does not match the certificate {cert_path}")
    return Issued(key=key, cert=cert)


def write_issued(
    issued: Issued, directory: Path, stem: str, *, force: bool = False
) -> tuple[Path, Path]:
    """Write STEM.key (0600) and STEM.crt (0644) into directory; return their paths.

    Existing files are refused unless force, checked for both before either is written.
    """
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    key_path = directory / f"{stem}.key"
    cert_path = directory / f"{stem}.crt"
    if not force:
        for path in (key_path, cert_path):
            if os.path.lexists(path):
                raise FileExistsError(f"refusing to overwrite existing {path}")
    _write_new_file(key_path, issued.key_pem(), KEY_FILE_MODE, replace=force)
    _write_new_file(cert_path, issued.cert_pem(), CERT_FILE_MODE, replace=force)
    return key_path, cert_path


def write_secret_file(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write data to a new 0600 file; refuse an existing path unless force."""
    _write_new_file(path, data, KEY_FILE_MODE, replace=force)


def _write_new_file(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Create path exclusively with mode from the first byte; replace removes an old file.

    O_EXCL guarantees a fresh inode that is never more permissive than mode and never
    a pre-planted symlink; fchmod makes the mode exact regardless of the umask.
    """
    if replace:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError as exc:
        raise FileExistsError(f"refusing to overwrite existing {path}") from exc
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def _issue_leaf(
    ca: Issued,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: x509.SubjectAlternativeName | None,
    days: int,
    not_before: datetime | None,
    not_after: datetime | None,
) -> Issued:
    _require_ca(ca.cert)
    key = ec.generate_private_key(CURVE)
    start, end = _validity(days, not_before, not_after)
    builder = (
        _base_builder(_cn_name(common_name), ca.cert.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans is not None:
        builder = builder.add_extension(sans, critical=False)
    return Issued(key=key, cert=builder.sign(ca.key, SIGNATURE_HASH))


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _cn_name(common_name: str) -> x509.Name:
    if not 1 <= len(common_name) <= MAX_COMMON_NAME_LEN:
        raise ValueError(
            f"common name must be 1-{MAX_COMMON_NAME_LEN} characters, got {len(common_name)}"
        )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _require_ca(cert: x509.Certificate) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError(f"{cert.subject.rfc4514_string()} is not a CA certificate")


#: The last moment an X.509 certificate can name (GeneralizedTime's).
LAST_MOMENT = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def _validity(
    days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    """Resolve the validity window; explicit bounds win over days."""
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    start = _aware(not_before) if not_before is not None else datetime.now(UTC) - CLOCK_SKEW
    most = (LAST_MOMENT - start).days
    if not_after is None and days > most:
        raise ValueError(
            f"days must be at most {most} (X.509 dates end with the year 9999), got {days}"
        )
    end = _aware(not_after) if not_after is not None else start + timedelta(days=days)
    if end <= start:
        raise ValueError(f"not_after ({end}) must be later than not_before ({start})")
    return start, end


def _aware(moment: datetime) -> datetime:
    # A naive datetime would silently be read as UTC by cryptography; refuse the ambiguity.
    if moment.tzinfo is None:
        raise ValueError(f"{moment} has no timezone; pass an aware datetime")
    return moment


def _check_dns_name(name: str) -> str:
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if len(name) > _MAX_DNS_NAME_LEN or not all(_DNS_LABEL_RE.fullmatch(x) for x in labels):
        raise ValueError(f"invalid DNS name {name!r}")
    return name


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}: expected IPv4 or IPv6") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError(f"invalid IP address {text!r}: a certificate cannot carry a scope id")
    return address
