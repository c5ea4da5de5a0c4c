"""netblk.tokens: generation, argon2id hashing, verification and length limits."""

from __future__ import annotations

import re

import pytest
from argon2 import PasswordHasher, Type

from netblk.tokens import (
    MAX_TOKEN_LEN,
    MEMORY_COST_KIB,
    MIN_TOKEN_LEN,
    PARALLELISM,
    TIME_COST,
    generate_token,
    hash_token,
    verify_token,
)

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def token_hash() -> str:
    return hash_token(TOKEN)


def test_generate_token_is_random_and_url_safe() -> None:
    generated = {generate_token() for _ in range(20)}
    assert len(generated) == 20
    for token in generated:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
        assert MIN_TOKEN_LEN <= len(token) <= MAX_TOKEN_LEN


def test_hash_is_argon2id_with_named_parameters(token_hash: str) -> None:
    prefix = f"$argon2id$v=19$m={MEMORY_COST_KIB},t={TIME_COST},p={PARALLELISM}$"
    assert token_hash.startswith(prefix)
    assert (TIME_COST, MEMORY_COST_KIB, PARALLELISM) == (3, 64 * 1024, 1)
    assert TOKEN not in token_hash


def test_hash_is_salted(token_hash: str) -> None:
    assert hash_token(TOKEN) != token_hash


def test_verify_accepts_right_token(token_hash: str) -> None:
    assert verify_token(token_hash, TOKEN) is True


def test_verify_rejects_wrong_token(token_hash: str) -> None:
    assert verify_token(token_hash, TOKEN + "x") is False
    assert verify_token(token_hash, TOKEN.upper()) is False


def test_generated_token_round_trip() -> None:
    token = generate_token()
    assert verify_token(hash_token(token), token) is True


@pytest.mark.parametrize(
    "bad_hash",
    [
        "",
        "not a hash",
        "$argon2id$",
        "$argon2id$v=19$m=65536,t=3,p=1$c2FsdA$",
        "$argon2id$v=19$m=65536,t=3,p=1$!!!!$!!!!",
        "$2b$12$abcdefghijklmnopqrstuu5r0aZg0aZg0aZg0aZg0aZg0aZg0aZg0",
    ],
)
def test_verify_malformed_hash_is_false(bad_hash: str) -> None:
    assert verify_token(bad_hash, TOKEN) is False


def test_verify_truncated_hash_is_false(token_hash: str) -> None:
    assert verify_token(token_hash[:-5], TOKEN) is False


@pytest.mark.parametrize("weaker", [Type.I, Type.D])
def test_verify_refuses_non_argon2id_hash(weaker: Type) -> None:
    """A config cannot downgrade to argon2i/argon2d, even with the right token."""
    other = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=weaker).hash(TOKEN)
    assert verify_token(other, TOKEN) is False


@pytest.mark.parametrize(
    "token",
    [
        "a" * MIN_TOKEN_LEN,
        "a" * MAX_TOKEN_LEN,
        "é" * (MIN_TOKEN_LEN // 2),  # 16 bytes in UTF-8 from 8 characters
    ],
    ids=["min", "max", "multibyte-min"],
)
def test_length_limits_inclusive(token: str) -> None:
    assert verify_token(hash_token(token), token) is True


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a" * (MIN_TOKEN_LEN - 1),
        "a" * (MAX_TOKEN_LEN + 1),
        "é" * (MAX_TOKEN_LEN // 2 + 1),  # 129 characters but 258 bytes
        "\ud800" * MIN_TOKEN_LEN,  # lone surrogates cannot be encoded
    ],
    ids=["empty", "short", "long", "multibyte-long", "surrogate"],
)
def test_length_limits_enforced(token: str, token_hash: str) -> None:
    with pytest.raises(ValueError, match="token"):
        hash_token(token)
    with pytest.raises(ValueError, match="token"):
        verify_token(token_hash, token)
