"""Who may log in to what: certificate identity, token, rights, throttling.

The TLS layer has already checked that the client certificate chains to the
configured CA; this module decides the rest.  ``Gatekeeper.decide`` blocks
(argon2id is slow on purpose) and runs on a worker thread.

Only credential failures (DENIED: a certificate name that is no client, or
a wrong token) count toward the throttle, against the peer address and the
certificate name: those are what a guesser tries.  A failed TLS handshake
guesses nothing (the CA's signature is not guessable) and NO_EXPORT or
FORBIDDEN come from a client that proved who it is; counting them would let
anyone lock the clients behind a shared address out.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from netblk.protocol.constants import LoginStatus
from netblk.tokens import hash_token, verify_token
from storaged.config import Access, ClientConfig, ExportConfig, LoginPolicy

#: Distinct peers/clients remembered by the throttle; oldest forgotten first.
MAX_THROTTLE_KEYS = 10_000


class FailureThrottle:
    """Refuses a key after ``max_failures`` failures within ``window`` seconds.

    Time is passed in, so tests drive it without sleeping.  Thread-safe.
    """

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()  # protects _failures

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def limited(self, key: str, now: float) -> bool:
        with self._lock:
            return len(self._recent(key, now)) >= self.max_failures

    def record_failure(self, key: str, now: float) -> None:
        with self._lock:
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times
            self._failures.move_to_end(key)
            while len(self._failures) > MAX_THROTTLE_KEYS:
                self._failures.popitem(last=False)


@dataclass(frozen=True)
class LoginDecision:
    status: LoginStatus
    reason: str
    access: Access = Access.NONE


class Gatekeeper:
    """Admits a client only if certificate identity AND token AND rights agree."""

    def __init__(
        self,
        clients: Mapping[str, ClientConfig],
        exports: Mapping[str, ExportConfig],
        policy: LoginPolicy,
    ) -> None:
        self._clients = clients
        self._exports = exports
        self.throttle = FailureThrottle(policy.max_failures, policy.window)
        # Unknown clients are checked against this, so timing does not reveal
        # which certificate names are configured.
        self._decoy_hash = hash_token(secrets.token_urlsafe(32))

    def decide(
        self, peer_host: str, identity: str | None, export: str, token: bytes, now: float
    ) -> LoginDecision:
        keys = [f"peer:{peer_host}"] + ([f"client:{identity}"] if identity else [])
        if any(self.throttle.limited(key, now) for key in keys):
            return LoginDecision(LoginStatus.RATE_LIMITED, "too many failed logins")
        decision = self._judge(identity, export, token)
        if decision.status is LoginStatus.DENIED:
            for key in keys:
                self.throttle.record_failure(key, now)
        return decision

    def _judge(self, identity: str | None, export: str, token: bytes) -> LoginDecision:
        client = self._clients.get(identity) if identity else None
        try:
            token_text: str | None = token.decode()
        except UnicodeDecodeError:
            token_text = None  # no configured token can match it
        token_ok = token_text is not None and verify_token(
            client.token_hash if client else self._decoy_hash, token_text
        )
        if client is None:
            return LoginDecision(
                LoginStatus.DENIED, f"certificate identity {identity!r} is not a configured client"
            )
        if not token_ok:
            return LoginDecision(LoginStatus.DENIED, "token does not match")
        config = self._exports.get(export)
        if config is None:
            return LoginDecision(LoginStatus.NO_EXPORT, f"no export named {export!r}")
        access = config.access.get(client.name, Access.NONE)
        if access is Access.NONE:
            return LoginDecision(LoginStatus.FORBIDDEN, f"no rights on export {export!r}")
        return LoginDecision(LoginStatus.OK, "", access)
