"""Block I/O on an unlocked LUKS2 volume file (the blocking half of storaged).

Methods here block (pread, pwrite, fdatasync, AES) and are called from the
server's worker threads, never from the event loop; they are thread-safe.

Sparse files: a sector whose ciphertext is all zeros is a hole (never
written, trimmed or zeroed) and reads back as plaintext zeros.  Real
AES-XTS output is all zeros with probability 2**-32768, so no data sector is
ever mistaken for a hole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from netblk.protocol.constants import Cmd, Errno
from storaged import luks2
from storaged._requests import Runner
from storaged.cache import SectorCache

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: Reads up to this size fill the cache; larger ones (scans) would only evict.
CACHE_MAX_READ = 128 << 10
#: WRITE_ZEROES without holes encrypts zeros in chunks of this size.
ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range so it reads back as zeros (size unchanged)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class ReadResult(NamedTuple):
    """A read's plaintext and whether the cache answered it (one per read)."""

    data: bytes
    cache_hit: bool


class Volume:
    """An unlocked volume: byte offsets are relative to its data segment."""

    _ids = iter(range(1, 1 << 62))
    _ids_lock = threading.Lock()

    def __init__(
        self,
        path: Path,
        volume_key: bytes,
        info: luks2.VolumeInfo,
        cache: SectorCache,
        *,
        read_only: bool = False,
    ) -> None:
        self.path = path
        self.sector_size = info.sector_size
        self.data_offset = info.data_offset
        self.read_only = read_only
        self._cipher = luks2.SectorCipher(volume_key, info.sector_size, info.iv_tweak)
        self._cache = cache
        with Volume._ids_lock:
            self._id = next(Volume._ids)
        self._fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self.size = info.data_size
        self._punch_supported = True

    @classmethod
    def open(
        cls, path: Path, passphrase: bytes, cache: SectorCache, *, read_only: bool = False
    ) -> Volume:
        """Unlock ``path`` with ``passphrase`` (slow: argon2id by design)."""
        info = luks2.read_info(path)
        key = luks2.unlock(path, passphrase)
        return cls(path, key, info, cache, read_only=read_only)

    def close(self) -> None:
        if self._fd < 0:
            return
        if not self.read_only:
            os.fdatasync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def runner(self, *, max_payload: int, writable: bool) -> Runner:
        """A connection's runner of plain READs and WRITEs in C, which does
        what ``read`` and ``write`` (without FUA) do."""
        return Runner(
            key=self._cipher.key,
            cache=self._cache,
            volume_id=self._id,
            fd=self._fd,
            data_offset=self.data_offset,
            sector_size=self.sector_size,
            iv_tweak=self._cipher.iv_tweak,
            export_size=self.size,
            max_payload=max_payload,
            writable=writable and not self.read_only,
            cache_max_read=CACHE_MAX_READ,
            read_op=Cmd.READ,
            write_op=Cmd.WRITE,
            ok=Errno.OK,
        )

    def _sectors(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.sector_size, length // self.sector_size

    def read(self, offset: int, length: int) -> ReadResult:
        first, count = self._sectors(offset, length)
        cached, admission = self._cache.lookup(
            self._id, first, count, admit=length <= CACHE_MAX_READ
        )
        if cached is not None:
            return ReadResult(b"".join(cached), cache_hit=True)
        data = self._cipher.pread(self._fd, self.data_offset + offset, offset, length)
        if admission is not None:
            self._cache.fill(self._id, first, data, admission)
        return ReadResult(data, cache_hit=False)

    def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        with self._changing(offset, len(data)):
            self._cipher.pwrite(self._fd, self.data_offset + offset, offset, data)
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        """Deallocate: the range reads back as zeros and frees space."""
        with self._changing(offset, length):
            self._deallocate(offset, length)
        if fua:
            self.flush()

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool, fua: bool) -> None:
        """Zero a range, keeping it allocated only when ``no_hole`` asks."""
        with self._changing(offset, length):
            if no_hole:
                for start in range(offset, offset + length, ZERO_CHUNK):
                    chunk = min(ZERO_CHUNK, offset + length - start)
                    self._cipher.pwrite(self._fd, self.data_offset + start, start, bytes(chunk))
            else:
                self._deallocate(offset, length)
        if fua:
            self.flush()

    @contextlib.contextmanager
    def _changing(self, offset: int, length: int) -> Iterator[None]:
        """Drop the range from the cache once the disk under it changed:
        after the change (so a read that raced it cannot put older data
        back), and even if it failed, since a write that failed part way
        may have changed some of its sectors."""
        try:
            yield
        finally:
            self._cache.invalidate(self._id, *self._sectors(offset, length))

    def flush(self) -> None:
        """Make every completed write durable (the FLUSH and FUA contract)."""
        os.fdatasync(self._fd)

    def _pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        position = self.data_offset + offset
        while view:
            written = os.pwrite(self._fd, view, position)
            view = view[written:]
            position += written

    def _deallocate(self, offset: int, length: int) -> None:
        if self._punch_supported:
            try:
                punch_hole(self._fd, self.data_offset + offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch_supported = False
        for start in range(offset, offset + length, ZERO_CHUNK):
            self._pwrite(start, bytes(min(ZERO_CHUNK, offset + length - start)))
