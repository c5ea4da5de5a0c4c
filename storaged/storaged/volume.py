"""An unlocked volume: a LUKS2 data segment on a store, ready for the engine.

``Volume.open`` reads the header and unlocks a keyslot (``storaged.luks2``),
then gives the engine (``storaged._engine``) what it needs to serve the
segment: the store (today a file or block device), the expanded AES-XTS key
and where the segment lies.  Every request then runs in the engine; the
methods here are for opening, flushing and closing.
"""

from __future__ import annotations

from pathlib import Path

from storaged import luks2
from storaged._engine import FileStore
from storaged._engine import Volume as EngineVolume
from storaged.sectors import CipherError, SectorCipher


class Volume:
    """An unlocked volume; ``engine`` serves its requests."""

    def __init__(
        self, path: Path, volume_key: bytes, info: luks2.VolumeInfo, *, read_only: bool = False
    ) -> None:
        try:
            cipher = SectorCipher(volume_key, info.sector_size, info.iv_tweak)
        except CipherError as exc:
            raise luks2.Luks2Error(f"{path}: {exc}") from None
        self.path = path
        self.read_only = read_only
        self.size = info.data_size
        store = FileStore(path, writable=not read_only)
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
            raise luks2.Luks2Error(f"{path}: {exc}") from None
        self._open = True

    @classmethod
    def open(cls, path: Path, passphrase: bytes, *, read_only: bool = False) -> Volume:
        """Unlock ``path`` with ``passphrase`` (slow: argon2id by design)."""
        info = luks2.read_info(path)
        key = luks2.unlock(path, passphrase)
        return cls(path, key, info, read_only=read_only)

    def flush(self) -> None:
        """Make every completed write durable (the FLUSH and FUA contract)."""
        self.engine.store.flush()

    def close(self) -> None:
        """Flush.  The store itself closes when the last connection still
        holding the engine's volume lets go, so a connection that outlives
        shutdown never writes through a descriptor number reused since."""
        if self._open and not self.read_only:
            self.flush()
        self._open = False
