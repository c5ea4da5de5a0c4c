"""Carry out one valid request on a volume (runs on a worker thread).

The codec has already checked ranges, alignment, flags and rights, so every
failure here is the storage's: ENOSPC from the file system, else EIO.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import NamedTuple

from netblk.protocol.codec import Request
from netblk.protocol.constants import Cmd, CmdFlag, Errno
from storaged.volume import Volume

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """What running a request gave (a NamedTuple: one per request, cheap)."""

    error: Errno
    data: bytes = b""
    cache_hit: bool | None = None


OK = Outcome(Errno.OK)
# Flag tests on plain ints: IntFlag's & runs Python code (enum.__and__).
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)


def _read(volume: Volume, request: Request) -> Outcome:
    data, cache_hit = volume.read(request.offset, request.length)
    return Outcome(Errno.OK, data, cache_hit)


def _write(volume: Volume, request: Request) -> Outcome:
    volume.write(request.offset, request.data, fua=bool(int(request.flags) & _FUA))
    return OK


def _flush(volume: Volume, request: Request) -> Outcome:
    volume.flush()
    return OK


def _trim(volume: Volume, request: Request) -> Outcome:
    volume.trim(request.offset, request.length, fua=bool(int(request.flags) & _FUA))
    return OK


def _write_zeroes(volume: Volume, request: Request) -> Outcome:
    volume.write_zeroes(
        request.offset,
        request.length,
        no_hole=bool(int(request.flags) & _NO_HOLE),
        fua=bool(int(request.flags) & _FUA),
    )
    return OK


HANDLERS: dict[Cmd, Callable[[Volume, Request], Outcome]] = {
    Cmd.READ: _read,
    Cmd.WRITE: _write,
    Cmd.FLUSH: _flush,
    Cmd.TRIM: _trim,
    Cmd.WRITE_ZEROES: _write_zeroes,
}


def execute(volume: Volume, request: Request) -> Outcome:
    """Run ``request``; storage failures become error replies, not exceptions."""
    try:
        return HANDLERS[request.opcode](volume, request)
    except OSError as exc:
        log.error(
            "storage I/O failed",
            extra={
                "event": "io_error",
                "volume": str(volume.path),
                "op": request.opcode.name,
                "offset": request.offset,
                "length": request.length,
                "error": str(exc),
            },
        )
        return Outcome(Errno.NOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT) else Errno.IO)
