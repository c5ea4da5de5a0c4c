"""Session-wide PKI files for tests that need real mutual-TLS material.

Import with ``from tests.pki_fixtures import pki, PkiFiles`` (in a conftest or a
test module); nothing here depends on a conftest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from netblk_certs.pki import (
    make_ca,
    make_client_cert,
    make_server_cert,
    write_issued,
)

SERVER_DNS = "localhost"
SERVER_IPS = ("127.0.0.1", "::1")
EXPIRED_AGE = timedelta(days=30)


@dataclass(frozen=True)
class PkiFiles:
    """Paths of the PEM files written by the ``pki`` fixture (all in ``dir``)."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    alice_cert: Path
    alice_key: Path
    bob_cert: Path
    bob_key: Path
    expired_cert: Path  # CN=alice from the real CA, validity ended a day ago
    expired_key: Path
    rogue_ca_cert: Path  # an unrelated CA ...
    rogue_cert: Path  # ... and its CN=alice client certificate ("mallory")
    rogue_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    """Write a CA, server, alice/bob clients, an expired alice and a rogue-CA alice."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    ca_key, ca_cert = write_issued(ca, directory, "ca")
    server_key, server_cert = write_issued(
        make_server_cert(ca, "storaged", dns_names=[SERVER_DNS], ip_addresses=SERVER_IPS),
        directory,
        "server",
    )
    alice_key, alice_cert = write_issued(make_client_cert(ca, "alice"), directory, "client-alice")
    bob_key, bob_cert = write_issued(make_client_cert(ca, "bob"), directory, "client-bob")
    now = datetime.now(UTC)
    expired = make_client_cert(
        ca, "alice", not_before=now - EXPIRED_AGE, not_after=now - timedelta(days=1)
    )
    expired_key, expired_cert = write_issued(expired, directory, "alice-expired")
    rogue_ca = make_ca("netblk CA")  # same name as the real CA: only the key tells them apart
    _, rogue_ca_cert = write_issued(rogue_ca, directory, "mallory-ca")
    rogue_key, rogue_cert = write_issued(make_client_cert(rogue_ca, "alice"), directory, "mallory")
    return PkiFiles(
        dir=directory,
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        alice_cert=alice_cert,
        alice_key=alice_key,
        bob_cert=bob_cert,
        bob_key=bob_key,
        expired_cert=expired_cert,
        expired_key=expired_key,
        rogue_ca_cert=rogue_ca_cert,
        rogue_cert=rogue_cert,
        rogue_key=rogue_key,
    )
