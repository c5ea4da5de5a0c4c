"""How netblk writes a socket address: ``host:port``, with an IPv6 literal
in brackets (RFC 3986 3.2.2), as the driver's ``servers`` file, the logs and
every daemon's messages show it."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """``192.0.2.1:10910``, ``[2001:db8::1]:10910``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
