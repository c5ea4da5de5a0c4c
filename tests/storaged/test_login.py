"""Login decisions and the failure throttle, without sockets."""

from __future__ import annotations

import pytest

from netblk.protocol.constants import LoginStatus
from netblk.tokens import hash_token
from storaged.config import Access, ClientConfig, ExportConfig, LoginPolicy
from storaged.login import FailureThrottle, Gatekeeper

TOKEN = "a-very-secret-token-of-enough-length"


@pytest.fixture(scope="module")
def token_hash() -> str:
    return hash_token(TOKEN)


@pytest.fixture
def gate(token_hash: str) -> Gatekeeper:
    """A fresh gatekeeper per test, so throttle state never leaks between tests."""
    clients = {"alice": ClientConfig("alice", token_hash)}
    exports = {
        "data": ExportConfig("data", None, None, "X", {"alice": Access.RO}),  # type: ignore[arg-type]
        "vault": ExportConfig("vault", None, None, "X", {}),  # type: ignore[arg-type]
    }
    return Gatekeeper(clients, exports, LoginPolicy(max_failures=3, window=60))


@pytest.mark.parametrize(
    ("identity", "export", "token", "status"),
    [
        ("alice", "data", TOKEN, LoginStatus.OK),
        ("alice", "data", TOKEN + "x", LoginStatus.DENIED),
        ("mallory", "data", TOKEN, LoginStatus.DENIED),
        (None, "data", TOKEN, LoginStatus.DENIED),
        ("alice", "nope", TOKEN, LoginStatus.NO_EXPORT),
        ("alice", "vault", TOKEN, LoginStatus.FORBIDDEN),
        ("alice", "data", "\udcff-not-utf8", LoginStatus.DENIED),
    ],
)
def test_decisions(
    gate: Gatekeeper, identity: str | None, export: str, token: str, status: LoginStatus
) -> None:
    raw = token.encode("utf-8", "surrogateescape")
    decision = gate.decide("192.0.2.1", identity, export, raw, now=0.0)
    assert decision.status is status
    assert (decision.reason == "") == (status is LoginStatus.OK)
    if status is LoginStatus.OK:
        assert decision.access is Access.RO


def test_throttle_limits_per_key_and_forgets_after_the_window() -> None:
    throttle = FailureThrottle(max_failures=3, window=10.0)
    for t in (0.0, 1.0, 2.0):
        assert not throttle.limited("peer:a", t)
        throttle.record_failure("peer:a", t)
    assert throttle.limited("peer:a", 3.0)
    assert not throttle.limited("peer:b", 3.0)
    assert not throttle.limited("peer:a", 10.5)  # the first failure aged out


def test_gatekeeper_refuses_a_correct_token_once_throttled(gate: Gatekeeper) -> None:
    for _ in range(3):
        gate.decide("192.0.2.7", "alice", "data", b"wrong-token-wrong-token", now=100.0)
    decision = gate.decide("192.0.2.7", "alice", "data", TOKEN.encode(), now=101.0)
    assert decision.status is LoginStatus.RATE_LIMITED
    # The client identity is throttled too, from any address...
    assert gate.decide("192.0.2.8", "alice", "data", TOKEN.encode(), now=101.0).status is (
        LoginStatus.RATE_LIMITED
    )
    # ...until the window passes.
    assert gate.decide("192.0.2.8", "alice", "data", TOKEN.encode(), now=200.0).status is (
        LoginStatus.OK
    )
