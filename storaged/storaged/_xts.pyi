"""AES-XTS over runs of data units (storaged/storaged/_xts.c)."""

from typing import final

from typing_extensions import Buffer

@final
class Key:
    """An AES-XTS key (32 or 64 bytes), expanded once for every later call."""

    def __init__(self, key: Buffer) -> None: ...
    def crypt(
        self,
        data: Buffer,
        unit_size: int,
        first_tweak: int,
        tweak_step: int,
        encrypt: bool,
        /,
    ) -> bytes: ...
    def pread(
        self,
        fd: int,
        position: int,
        length: int,
        unit_size: int,
        first_tweak: int,
        tweak_step: int,
        /,
    ) -> bytes: ...
    def pwrite(
        self,
        fd: int,
        position: int,
        data: Buffer,
        unit_size: int,
        first_tweak: int,
        tweak_step: int,
        /,
    ) -> None: ...
