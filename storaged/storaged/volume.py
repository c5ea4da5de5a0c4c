"""An unlocked volume: a LUKS2 data segment on a store, ready for the engine.

``Volume.open`` opens the store the export names (a file or block device,
or a Ceph RBD image), reads the LUKS2 header and unlocks a keyslot
(``storaged.luks2``), then gives the engine (``storaged._engine``) what it
needs to serve the segment: the store, the expanded AES-XTS key and where
the segment lies.  Every request then runs in the engine; the methods here
are for opening, flushing and closing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from storaged import luks2
from storaged._engine import FileStore, RbdStore, Store
from storaged._engine import Volume as EngineVolume
from storaged.config import Location, RbdImage
from storaged.sectors import CipherError, SectorCipher


def open_store(location: Location, *, writable: bool) -> Store:
    """The store of a volume (blocking: an RBD image is a cluster connection)."""
    if isinstance(location, RbdImage):
        return RbdStore(
            location.pool,
            location.image,
            conf=str(location.conf),
            client=location.client,
            keyring=str(location.keyring) if location.keyring else None,
            writable=writable,
        )
    return FileStore(location, writable=writable)


@contextlib.contextmanager
def header_file(location: Location, store: Store) -> Iterator[Path]:
    """A path ``luks2`` can read the volume's header from: the file itself,
    or for an image a memory file as large as the image holding a copy of
    everything before its data segment (header copies and keyslots)."""
    if not isinstance(location, RbdImage):
        yield location
        return
    size = store.size
    fd = os.memfd_create("luks2-header", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        path = Path(f"/proc/self/fd/{fd}")
        copied = min(size, luks2.DATA_OFFSET)
        os.pwrite(fd, store.pread(0, copied), 0)
        before_data = luks2.read_info(path).data_offset
        if before_data > copied:
            os.pwrite(fd, store.pread(copied, min(size, before_data) - copied), copied)
        yield path
    finally:
        os.close(fd)


class Volume:
    """An unlocked volume; ``engine`` serves its requests."""

    def __init__(
        self,
        location: Location,
        store: Store,
        volume_key: bytes,
        info: luks2.VolumeInfo,
        *,
        read_only: bool = False,
    ) -> None:
        try:
            cipher = SectorCipher(volume_key, info.sector_size, info.iv_tweak)
        except CipherError as exc:
            raise luks2.Luks2Error(f"{location}: {exc}") from None
        self.location = location
        self.read_only = read_only
        self.size = info.data_size
        try:
            self.engine = EngineVolume(
                store,
                cipher.key,
                data_offset=info.data_offset,
                size=info.data_size,
                sector_size=info.sector_size,
                iv_tweak=info.iv_tweak,
            )
        except ValueError as exc:
            raise luks2.Luks2Error(f"{location}: {exc}") from None
        self._open = True

    @classmethod
    def open(cls, location: Location, passphrase: bytes, *, read_only: bool = False) -> Volume:
        """Unlock the volume at ``location`` (slow: argon2id by design)."""
        store = open_store(location, writable=not read_only)
        with header_file(location, store) as header:
            info = luks2.read_info(header)
            key = luks2.unlock(header, passphrase)
        return cls(location, store, key, info, read_only=read_only)

    @property
    def rbd_store(self) -> RbdStore:
        """The store, for a volume on an RBD image (its lock and lease)."""
        store = self.engine.store
        assert isinstance(store, RbdStore), self.location
        return store

    def flush(self) -> None:
        """Make every completed write durable (the FLUSH and FUA contract)."""
        self.engine.store.flush()

    def close(self, *, flush: bool = True) -> None:
        """Flush (unless told not to: a fenced store refuses it).  The store
        itself closes when the last connection still holding the engine's
        volume lets go, so a connection that outlives shutdown never writes
        through a descriptor number reused since."""
        if self._open and flush and not self.read_only:
            self.flush()
        self._open = False
