"""AES-XTS over runs of data units (storaged/storaged/_xts.c)."""

from typing_extensions import Buffer

def crypt(
    key: bytes,
    data: Buffer,
    unit_size: int,
    first_tweak: int,
    tweak_step: int,
    encrypt: bool,
    keep_holes: bool,
    /,
) -> bytes: ...
