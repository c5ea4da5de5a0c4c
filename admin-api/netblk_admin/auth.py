"""Bearer tokens, checked against the config's argon2id hashes.

argon2id is slow on purpose (tens of ms and 64 MiB per check with
``netblk-certs token``'s cost), so it runs on worker threads, at most
``MAX_CONCURRENT_CHECKS`` at once whatever arrives, and only once per token:
a token that verified is remembered by its HMAC under a key that lives and
dies with the process.

Timing: a wrong token always costs one argon2id check per configured hash
(there is no early exit before a match), and the memo is keyed by an HMAC
the caller cannot predict, so neither path tells an attacker anything about
the configured tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Mapping

from netblk.tokens import verify_token

#: argon2id checks at once: bounds memory and CPU under a flood of bad tokens.
MAX_CONCURRENT_CHECKS = 2
MEMO_KEY_BYTES = 32


class TokenVerifier:
    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._hashes = dict(hashes)
        self._memo_key = secrets.token_bytes(MEMO_KEY_BYTES)
        # Only tokens that verified get in: at most one per configured hash.
        self._verified: dict[bytes, str] = {}
        self._checks = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)

    async def identify(self, token: str) -> str | None:
        """The configured name of ``token``, or None if it matches no hash."""
        memo = hmac.new(self._memo_key, token.encode(), hashlib.sha256).digest()
        name = self._verified.get(memo)
        if name is None:
            async with self._checks:
                name = await asyncio.to_thread(self._check, token)
            if name is not None:
                self._verified[memo] = name
        return name

    def _check(self, token: str) -> str | None:
        for name, token_hash in self._hashes.items():
            try:
                if verify_token(token_hash, token):
                    return name
            except ValueError:  # outside the token length limits: no hash can match
                return None
        return None
