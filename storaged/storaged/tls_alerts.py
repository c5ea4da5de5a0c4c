"""Make asyncio send the TLS alert when a server-side handshake fails.

CPython's asyncio (gh-98078, still present in 3.11-3.13) closes the
connection on a failed handshake without flushing the alert OpenSSL has
queued, so a client refused for its certificate sees a bare EOF and can't
tell "certificate expired" from a crashed server.  ``install`` wraps
``SSLProtocol._do_handshake`` to flush outgoing TLS data (the alert) before
the failure is reported.  It is idempotent and only patches a class that
has the exact private methods it relies on.
"""

from __future__ import annotations

import ssl
from asyncio import sslproto
from typing import Any

_PATCHED = "_netblk_sends_alerts"


def install() -> bool:
    """Patch asyncio once; returns False if its internals are not the
    expected ones (then nothing is changed)."""
    cls: Any = sslproto.SSLProtocol
    if getattr(cls, _PATCHED, False):
        return True
    needed = ("_do_handshake", "_process_outgoing", "_on_handshake_complete")
    if not all(hasattr(cls, name) for name in needed):
        return False
    again_errors = getattr(sslproto, "SSLAgainErrors", (ssl.SSLWantReadError, ssl.SSLSyscallError))

    def _do_handshake(self: Any) -> None:
        try:
            self._sslobj.do_handshake()
        except again_errors:
            self._process_outgoing()
        except ssl.SSLError as exc:
            self._process_outgoing()  # the alert explaining the refusal
            self._on_handshake_complete(exc)
        else:
            self._on_handshake_complete(None)

    cls._do_handshake = _do_handshake
    setattr(cls, _PATCHED, True)
    return True
