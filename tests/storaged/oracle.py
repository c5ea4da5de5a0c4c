"""Python oracles for storaged's engine (storaged/engine/*.c).

What the C does, said plainly in Python, so tests can hold the engine to
it under hypothesis:

- ``FrameOracle`` decodes and checks request frames (a ``FrameScanner``
  for ``netblk.protocol.codec.ServerConnection``, as the engine's
  ``Scanner`` is): the checks the codec made before the engine took them.
- ``StoreOracle`` is the file store: pread, pwrite, punched holes, fsync,
  and injected failures that stop a write part way.
- ``run`` and ``flush`` are the engine's ``run`` and ``flush``: the same
  batch boundaries, replies, notes, volume bytes and counts, computed one
  request after another with ``storaged.sectors.SectorCipher``.
- ``CountsOracle`` counts as ``Counters`` does (latencies aside).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netblk.protocol.codec import ExportGeometry, FrameKind, encode_reply
from netblk.protocol.constants import (
    BLOCK_SIZE,
    REQUEST,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ExportFlag,
)
from storaged._engine import STOP_BROKEN, STOP_DISCONNECT, STOP_FLUSH, STOP_FULL, STOP_SHORT
from storaged.sectors import SectorCipher

Frame = tuple[int, int, int, int, int, int, int, int, str]
Note = tuple[str, int, int, int, int, int, str]

ALLOWED_FLAGS = {
    Cmd.READ: 0,
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.FLUSH: 0,
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE),
    Cmd.DISCONNECT: 0,
}
REQUIRED_EXPORT_FLAG = {
    Cmd.FLUSH: ExportFlag.SEND_FLUSH,
    Cmd.TRIM: ExportFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: ExportFlag.SEND_WRITE_ZEROES,
}
MUTATING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
RANGED = MUTATING | {Cmd.READ}
#: WRITE_ZEROES with NO_HOLE writes encrypted zeros in chunks of this size.
ZERO_CHUNK = 1 << 20


def check_request(
    geometry: ExportGeometry, opcode: int, flags: int, offset: int, length: int, reserved: int
) -> tuple[Errno, str]:
    """Why a well-framed request must be refused, as (errno, reason)."""
    try:
        cmd = Cmd(opcode)
    except ValueError:
        return Errno.INVAL, f"unknown opcode {opcode}"
    if reserved:
        return Errno.INVAL, "non-zero reserved field"
    if flags & ~ALLOWED_FLAGS[cmd]:
        return Errno.INVAL, f"flags {flags:#x} not valid for {cmd.name}"
    needed = REQUIRED_EXPORT_FLAG.get(cmd)
    if needed is not None and not geometry.flags & needed:
        return Errno.NOTSUP, f"export does not offer {cmd.name}"
    if cmd in MUTATING and geometry.flags & ExportFlag.READ_ONLY:
        return Errno.PERM, f"{cmd.name} on a read-only export"
    if cmd not in RANGED:
        if offset or length:
            return Errno.INVAL, f"{cmd.name} with offset or length"
        return Errno.OK, ""
    if length == 0 or offset % BLOCK_SIZE or length % BLOCK_SIZE:
        return Errno.INVAL, f"range {offset}+{length} is empty or not {BLOCK_SIZE}-aligned"
    if cmd is Cmd.READ and length > geometry.max_payload:
        return Errno.OVERFLOW, f"READ of {length} bytes exceeds max payload"
    if offset + length > geometry.size:
        beyond = Errno.NOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.INVAL
        return beyond, f"range {offset}+{length} beyond export size {geometry.size}"
    return Errno.OK, ""


class FrameOracle:
    """The request frame rules of docs/protocol.md, one frame at a time."""

    def __init__(self, geometry: ExportGeometry) -> None:
        self.geometry = geometry
        self.handles: set[int] = set()

    @property
    def inflight(self) -> int:
        return len(self.handles)

    def peek(self, buffer: bytes | bytearray, start: int) -> Frame:
        """The frame at ``start``, nothing recorded."""
        short = (int(FrameKind.SHORT), 0, 0, 0, 0, 0, 0, 0, "")
        if len(buffer) - start < REQUEST.size:
            return short
        magic, flags, opcode, handle, offset, length, reserved = REQUEST.layout.unpack_from(
            buffer, start
        )
        size = REQUEST.size

        def frame(kind: FrameKind, error: int = 0, reason: str = "") -> Frame:
            return (int(kind), size, opcode, flags, handle, offset, length, error, reason)

        if magic != REQUEST_MAGIC:
            return frame(FrameKind.BROKEN, reason=f"bad request magic {magic:#010x}")
        if opcode == Cmd.WRITE:
            if length > self.geometry.max_payload:
                return frame(
                    FrameKind.BROKEN, reason=f"WRITE of {length} bytes exceeds max payload"
                )
            if len(buffer) - start - REQUEST.size < length:
                return short
            size += length
        if handle in self.handles:
            return frame(FrameKind.BROKEN, reason=f"handle {handle:#x} is already in flight")
        error, reason = check_request(self.geometry, opcode, flags, offset, length, reserved)
        if error is not Errno.OK:
            return frame(FrameKind.INVALID, int(error), reason)
        if opcode == Cmd.DISCONNECT:
            return frame(FrameKind.DISCONNECT)
        return frame(FrameKind.REQUEST)

    def scan(self, buffer: bytearray, start: int, /) -> Frame:
        found = self.peek(buffer, start)
        if found[0] in (FrameKind.REQUEST, FrameKind.INVALID):
            self.handles.add(found[4])
        return found

    def answer(self, handle: int, error: int, /) -> bytes:
        self.handles.discard(handle)
        return encode_reply(handle, error)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class StoreOracle:
    """The file store: a file, with failures injected by range."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.faults: list[tuple[int, int, int]] = []
        self.syncs = 0

    def close(self) -> None:
        os.close(self.fd)

    def inject_error(self, offset: int, length: int, error: int) -> None:
        self.faults.append((offset, offset + length, error))

    def _fault(self, offset: int, length: int) -> tuple[int, int]:
        """(bytes before the first failing one, its errno or 0)."""
        good, error = length, 0
        for start, end, code in self.faults:
            if end <= offset or start >= offset + length:
                continue
            if start <= offset:
                return 0, code
            if start - offset < good:
                good, error = start - offset, code
        return good, error

    def read(self, offset: int, length: int) -> tuple[bytes, int]:
        _, error = self._fault(offset, length)
        if error:
            return b"", error
        return os.pread(self.fd, length, offset).ljust(length, b"\0"), 0

    def write(self, offset: int, data: bytes) -> int:
        good, error = self._fault(offset, len(data))
        os.pwrite(self.fd, data[:good], offset)
        return error

    def zero(self, offset: int, length: int) -> int:
        good, error = self._fault(offset, length)
        if good and _libc.fallocate(
            self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, good
        ):
            return ctypes.get_errno()
        return error

    def flush(self) -> int:
        os.fdatasync(self.fd)
        self.syncs += 1
        return 0


@dataclass
class VolumeOracle:
    """A LUKS2 data segment on a ``StoreOracle``."""

    store: StoreOracle
    cipher: SectorCipher
    data_offset: int
    size: int

    def read(self, offset: int, length: int) -> tuple[bytes, int]:
        raw, error = self.store.read(self.data_offset + offset, length)
        if error:
            return b"", error
        sector = self.cipher.sector_size
        plain = bytearray(self.cipher.decrypt(offset, raw))
        for at in range(0, length, sector):  # all-zero ciphertext is a hole
            if not any(raw[at : at + sector]):
                plain[at : at + sector] = bytes(sector)
        return bytes(plain), 0

    def write(self, offset: int, data: bytes) -> int:
        return self.store.write(self.data_offset + offset, self.cipher.encrypt(offset, data))

    def zero(self, offset: int, length: int, *, no_hole: bool) -> int:
        if not no_hole:
            return self.store.zero(self.data_offset + offset, length)
        for start in range(offset, offset + length, ZERO_CHUNK):
            error = self.write(start, bytes(min(ZERO_CHUNK, offset + length - start)))
            if error:
                return error
        return 0


@dataclass
class CountsOracle:
    """What ``Counters.snapshot()`` says, latencies' values aside."""

    requests: Counter[int] = field(default_factory=Counter)
    refused: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    timed: int = 0

    def request(self, opcode: int, length: int, error: int) -> None:
        self.requests[opcode] += 1
        self.timed += 1
        if error:
            self.errors += 1
        elif opcode == Cmd.READ:
            self.bytes_read += length
        elif opcode == Cmd.WRITE:
            self.bytes_written += length

    def refusal(self) -> None:
        self.refused += 1
        self.errors += 1

    def matches(self, snapshot: dict[str, Any]) -> bool:
        return (
            snapshot["requests"] == dict(self.requests)
            and snapshot["refused"] == self.refused
            and snapshot["bytes_read"] == self.bytes_read
            and snapshot["bytes_written"] == self.bytes_written
            and snapshot["errors"] == self.errors
            and snapshot["latency"]["count"] == self.timed
            and sum(snapshot["latency"]["buckets"]) == self.timed
        )


def wire_error(error: int) -> int:
    return int(Errno.NOSPC if error in (errno.ENOSPC, errno.EDQUOT) else Errno.IO)


def _overlaps(batch: list[Frame], frame: Frame) -> bool:
    _, _, opcode, _, _, offset, length, _, _ = frame
    if opcode not in RANGED:
        return False
    for kind, _, other, _, _, at, size, _, _ in batch:
        if kind != FrameKind.REQUEST or other not in RANGED:
            continue
        if (
            (opcode in MUTATING or other in MUTATING)
            and offset < at + size
            and at < offset + length
        ):
            return True
    return False


@dataclass
class _Batch:
    taken: list[tuple[Frame, bytes]] = field(default_factory=list)  # frame, payload
    consumed: int = 0
    payload: int = 0
    stop: int = STOP_FULL
    detail: int | str | None = None


def _take(
    scanner: FrameOracle, buffer: bytearray, start: int, room: int, payload_room: int
) -> _Batch:
    """Step 1 of a batch: the frames it takes and why it ends."""
    batch = _Batch()
    while len(batch.taken) < room and batch.payload <= payload_room:
        found = scanner.peek(buffer, start + batch.consumed)
        kind, size, opcode, _, handle, _, length, _, reason = found
        if kind == FrameKind.SHORT:
            batch.stop = STOP_SHORT
        elif kind == FrameKind.BROKEN:
            batch.stop, batch.detail = STOP_BROKEN, reason
        elif kind == FrameKind.DISCONNECT:
            batch.consumed += size
            batch.stop = STOP_DISCONNECT
        if kind in (FrameKind.SHORT, FrameKind.BROKEN, FrameKind.DISCONNECT):
            break
        if kind == FrameKind.REQUEST and _overlaps([f for f, _ in batch.taken], found):
            break
        scanner.handles.add(handle)
        at = start + batch.consumed
        batch.consumed += size
        if kind == FrameKind.REQUEST and opcode == Cmd.FLUSH:
            batch.stop, batch.detail = STOP_FLUSH, handle
            break
        batch.taken.append((found, bytes(buffer[at + REQUEST.size : at + size])))
        if kind == FrameKind.REQUEST and opcode in (Cmd.READ, Cmd.WRITE):
            batch.payload += length
    return batch


def _execute(volume: VolumeOracle, found: Frame, data: bytes) -> tuple[int, bytes]:
    """One request against the volume: (errno or 0, a READ's plaintext)."""
    _, _, opcode, flags, _, offset, length, _, _ = found
    if opcode == Cmd.READ:
        read, failure = volume.read(offset, length)
        return failure, read
    if opcode == Cmd.WRITE:
        return volume.write(offset, data), b""
    return volume.zero(offset, length, no_hole=bool(flags & CmdFlag.NO_HOLE)), b""


def run(
    scanner: FrameOracle,
    volume: VolumeOracle,
    counts: CountsOracle,
    buffer: bytearray,
    start: int,
    room: int,
    payload_room: int,
) -> tuple[int, bytes, int, int, int, int | str | None, list[Note]]:
    """``storaged._engine.run``, one request after another."""
    batch = _take(scanner, buffer, start, room, payload_room)
    done = [
        (0, b"") if found[0] == FrameKind.INVALID else _execute(volume, found, data)
        for found, data in batch.taken
    ]
    fua = any(
        found[0] == FrameKind.REQUEST and not failure and found[3] & CmdFlag.FUA
        for (found, _), (failure, _) in zip(batch.taken, done, strict=True)
    )
    synced = volume.store.flush() if fua else 0
    reply = bytearray()
    notes: list[Note] = []
    for (found, _), (failure, read) in zip(batch.taken, done, strict=True):
        kind, _, opcode, flags, handle, offset, length, refusal, reason = found
        scanner.handles.discard(handle)
        if kind == FrameKind.INVALID:
            reply += encode_reply(handle, refusal)
            counts.refusal()
            notes.append(("refused", handle, opcode, offset, length, refusal, reason))
            continue
        failed = failure or (synced if flags & CmdFlag.FUA else 0)
        error = wire_error(failed) if failed else 0
        reply += encode_reply(handle, error)
        if opcode == Cmd.READ and not error:
            reply += read
        counts.request(opcode, length, error)
        if failed:
            notes.append(("io_error", handle, opcode, offset, length, error, os.strerror(failed)))
    return (
        batch.consumed,
        bytes(reply),
        len(batch.taken),
        batch.payload,
        batch.stop,
        batch.detail,
        notes,
    )


def flush(
    scanner: FrameOracle, volume: VolumeOracle, counts: CountsOracle, handle: int
) -> tuple[int, Note | None]:
    """``storaged._engine.flush``: the handle stays in flight."""
    failure = volume.store.flush()
    error = wire_error(failure) if failure else 0
    counts.request(Cmd.FLUSH, 0, error)
    note = (
        ("io_error", handle, int(Cmd.FLUSH), 0, 0, error, os.strerror(failure)) if failure else None
    )
    return error, note
