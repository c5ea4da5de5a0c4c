"""Login and bearer tokens: random secrets stored only as argon2id hashes.

storaged (client login) and the admin API (bearer token) keep nothing but the
PHC-format hash in their config, so a leaked config does not leak a token.
"""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from netblk.protocol.constants import MAX_TOKEN, MIN_TOKEN

TOKEN_BYTES = 32  # entropy of a generated token; 43 URL-safe characters
MIN_TOKEN_LEN = MIN_TOKEN  # bytes of UTF-8: the wire protocol's limits
MAX_TOKEN_LEN = MAX_TOKEN

TIME_COST = 3
MEMORY_COST_KIB = 64 * 1024  # 64 MiB
PARALLELISM = 1
HASH_LEN = 32
SALT_LEN = 16
# Only argon2id hashes are accepted, so a config cannot downgrade to argon2i/argon2d.
HASH_PREFIX = "$argon2id$"

_HASHER = PasswordHasher(
    time_cost=TIME_COST,
    memory_cost=MEMORY_COST_KIB,
    parallelism=PARALLELISM,
    hash_len=HASH_LEN,
    salt_len=SALT_LEN,
    type=Type.ID,
)


def generate_token() -> str:
    """Return a new random URL-safe token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """Return the argon2id PHC string for token (salted: differs on every call)."""
    _check_length(token)
    return _HASHER.hash(token)


def verify_token(token_hash: str, token: str) -> bool:
    """Tell whether token matches token_hash; a malformed or non-argon2id hash never matches.

    Raises ValueError only when token itself is outside the length limits.
    """
    _check_length(token)
    if not token_hash.startswith(HASH_PREFIX):
        return False
    try:
        return _HASHER.verify(token_hash, token)
    except (VerificationError, InvalidHashError):
        return False


def _check_length(token: str) -> None:
    try:
        size = len(token.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("token is not valid UTF-8 text") from None
    if not MIN_TOKEN_LEN <= size <= MAX_TOKEN_LEN:
        raise ValueError(f"token must be {MIN_TOKEN_LEN}-{MAX_TOKEN_LEN} bytes, got {size}")
