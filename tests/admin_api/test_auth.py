"""Token checks: names for good tokens, None for anything else, argon2id once
per good token, and never more than MAX_CONCURRENT_CHECKS at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from netblk.tokens import verify_token
from netblk_admin import auth
from netblk_admin.auth import MAX_CONCURRENT_CHECKS, TokenVerifier
from tests.admin_api.conftest import OTHER_TOKEN, TOKEN, TOKENS


def identify(verifier: TokenVerifier, *tokens: str) -> list[str | None]:
    async def run() -> list[str | None]:
        return list(await asyncio.gather(*(verifier.identify(token) for token in tokens)))

    return asyncio.run(run())


def test_each_token_is_known_by_its_name() -> None:
    verifier = TokenVerifier(TOKENS)
    assert identify(verifier, TOKEN, OTHER_TOKEN) == ["ops", "monitoring"]


@pytest.mark.parametrize(
    "token",
    [TOKEN + "x", TOKEN[:-1], TOKEN.upper(), "", "short", "x" * 257, "t\u00f6ken-" * 5],
    ids=["longer", "shorter", "case", "empty", "below-min", "above-max", "non-ascii"],
)
def test_anything_else_is_nobody(token: str) -> None:
    assert identify(TokenVerifier(TOKENS), token) == [None]


def test_a_good_token_costs_one_argon2id_check_a_bad_one_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[str] = []

    def counting(token_hash: str, token: str) -> bool:
        checked.append(token)
        return verify_token(token_hash, token)

    monkeypatch.setattr(auth, "verify_token", counting)
    verifier = TokenVerifier(TOKENS)
    assert identify(verifier, TOKEN) == ["ops"]
    assert identify(verifier, TOKEN) == ["ops"]
    assert checked == [TOKEN]  # ops is the first hash: one check, then remembered
    checked.clear()
    assert identify(verifier, "wrong-token-0123456789") == [None]
    assert identify(verifier, "wrong-token-0123456789") == [None]
    assert len(checked) == 2 * len(TOKENS)  # every hash, each time: no early exit


def test_checks_at_once_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def slow(_token_hash: str, _token: str) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return False

    monkeypatch.setattr(auth, "verify_token", slow)
    tokens = [f"bad-token-number-{i:04d}" for i in range(8)]
    assert identify(TokenVerifier(TOKENS), *tokens) == [None] * 8
    assert peak == MAX_CONCURRENT_CHECKS
