"""The per-request cipher: AES-XTS over sectors with dm-crypt's plain64 IVs.

How a LUKS2 data segment (and a keyslot area) is sealed: a sector is an
XTS data unit whose tweak is ``segment_offset // 512 + iv_tweak`` (plain64
counts 512-byte units even with 4096-byte sectors), zero-padded to 16
bytes little-endian.  storaged's engine applies the same rule in C to every
request (``storaged/engine/xts.c``, ``volume.c``); this module is the
Python face of it for keyslots, tools and tests.  The header format and
keyslots are ``storaged.luks2``.
"""

from __future__ import annotations

import hmac

from storaged._engine import Key

#: AES-128-XTS and AES-256-XTS: two AES keys back to back.
XTS_KEY_SIZES = (32, 64)
#: dm-crypt's plain64 IV counts 512-byte units whatever the sector size, and
#: keyslot areas are encrypted in 512-byte sectors.
IV_UNIT = 512
#: plain64 is a 64-bit little-endian counter zero-padded to the 16-byte tweak.
PLAIN64_LIMIT = 1 << 64
#: Supported data-segment sector sizes (powers of two, dm-crypt's range).
MIN_SECTOR_SIZE = 512
MAX_SECTOR_SIZE = 4096
DEFAULT_SECTOR_SIZE = 4096


class CipherError(ValueError):
    """A key, sector size, tweak or range the cipher cannot take."""


def valid_sector_size(size: int) -> bool:
    return MIN_SECTOR_SIZE <= size <= MAX_SECTOR_SIZE and size & (size - 1) == 0


class SectorCipher:
    """AES-XTS with plain64 IVs for one key, sector size and tweak offset.

    A whole run of sectors goes through one OpenSSL context in one call,
    with the GIL released; the key is expanded once, when the cipher is made,
    and ``key`` shares the expanded key with the engine.
    """

    __slots__ = ("_iv_tweak", "_key", "_sector_size", "_step")

    def __init__(
        self, volume_key: bytes, sector_size: int = DEFAULT_SECTOR_SIZE, iv_tweak: int = 0
    ) -> None:
        if len(volume_key) not in XTS_KEY_SIZES:
            raise CipherError(f"AES-XTS needs a 256- or 512-bit key, got {len(volume_key) * 8}")
        half = len(volume_key) // 2
        if hmac.compare_digest(volume_key[:half], volume_key[half:]):
            raise CipherError("AES-XTS key halves must differ")
        if not valid_sector_size(sector_size):
            raise CipherError(f"unsupported sector size {sector_size}")
        if not 0 <= iv_tweak < PLAIN64_LIMIT:
            raise CipherError(f"iv_tweak {iv_tweak} is outside the plain64 IV range")
        self._key = Key(volume_key)
        self._sector_size = sector_size
        self._step = sector_size // IV_UNIT  # plain64 units per sector
        self._iv_tweak = iv_tweak

    @property
    def key(self) -> Key:
        """The expanded key, for the engine's volume."""
        return self._key

    @property
    def sector_size(self) -> int:
        return self._sector_size

    @property
    def iv_tweak(self) -> int:
        return self._iv_tweak

    def encrypt(self, segment_offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt whole sectors that start ``segment_offset`` bytes into the segment."""
        return self._crypt(segment_offset, data, encrypt=True)

    def decrypt(self, segment_offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """Decrypt whole sectors that start ``segment_offset`` bytes into the segment."""
        return self._crypt(segment_offset, data, encrypt=False)

    def _crypt(
        self, segment_offset: int, data: bytes | bytearray | memoryview, *, encrypt: bool
    ) -> bytes:
        first = self.first_tweak(segment_offset, memoryview(data).nbytes)
        return self._key.crypt(data, self._sector_size, first, self._step, encrypt)

    def first_tweak(self, segment_offset: int, length: int) -> int:
        """The plain64 tweak of the first of the sectors a run covers."""
        size = self._sector_size
        if segment_offset < 0 or segment_offset % size or length % size:
            raise CipherError(
                f"I/O must cover whole {size}-byte sectors "
                f"(offset {segment_offset}, length {length})"
            )
        first = segment_offset // IV_UNIT + self._iv_tweak
        if first + (length // size) * self._step > PLAIN64_LIMIT:
            raise CipherError(f"offset {segment_offset} is beyond the plain64 IV range")
        return first
