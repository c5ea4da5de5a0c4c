"""The protocol's rule for export and client names, shared by storaged, the
client library, netblk-certs, tls-bridge and the admin API so they all
accept the same set."""

from __future__ import annotations

import re

from netblk.protocol.constants import MAX_EXPORT_NAME

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if valid, else raise ValueError naming ``what``.

    1..MAX_EXPORT_NAME ASCII letters, digits, ``.``, ``_`` and ``-``, not
    starting with ``.`` or ``-`` (so a name is never a path or an option).
    """
    if not 0 < len(name) <= MAX_EXPORT_NAME:
        raise ValueError(f"{what} must be 1..{MAX_EXPORT_NAME} characters")
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} may hold only letters, digits, '.', '_' and '-'"
            " and must not start with '.' or '-'"
        )
    return name


def validate_export_name(name: str) -> str:
    return validate_name(name, "export name")


def validate_client_name(name: str) -> str:
    return validate_name(name, "client name")
