"""netblk.addresses: one way to write host and port."""

from __future__ import annotations

import pytest

from netblk.addresses import host_port


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("192.0.2.1", 10910, "192.0.2.1:10910"),
        ("2001:db8::1", 10910, "[2001:db8::1]:10910"),
        ("::1", 1, "[::1]:1"),
        ("::ffff:192.0.2.1", 65535, "[::ffff:192.0.2.1]:65535"),
        ("localhost", 443, "localhost:443"),
    ],
)
def test_ipv6_literals_are_bracketed_and_nothing_else_is(host: str, port: int, text: str) -> None:
    assert host_port(host, port) == text
