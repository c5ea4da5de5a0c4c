"""storaged's request engine in C (storaged/engine/*.c): framing and
validation, execution of a batch against a volume, AES-XTS, stores and
request statistics."""

from os import PathLike
from typing import Any, Final, final

from typing_extensions import Buffer

FRAME_SHORT: Final[int]
FRAME_REQUEST: Final[int]
FRAME_INVALID: Final[int]
FRAME_DISCONNECT: Final[int]
FRAME_BROKEN: Final[int]
STOP_FULL: Final[int]
STOP_SHORT: Final[int]
STOP_FLUSH: Final[int]
STOP_DISCONNECT: Final[int]
STOP_BROKEN: Final[int]
LATENCY_BUCKETS: Final[int]

#: (event, handle, opcode, offset, length, error, reason): "refused" or "io_error".
Note = tuple[str, int, int, int, int, int, str]

@final
class Key:
    """An AES-XTS key (32 or 64 bytes), expanded once for every later run."""

    def __init__(self, key: Buffer) -> None: ...
    def crypt(
        self, data: Buffer, unit_size: int, first_tweak: int, tweak_step: int, encrypt: bool, /
    ) -> bytes: ...

class Store:
    """Where a volume's bytes live."""

    @property
    def size(self) -> int: ...
    @property
    def writable(self) -> bool: ...
    @property
    def syncs(self) -> int: ...
    def flush(self) -> None: ...
    def pread(self, offset: int, length: int, /) -> bytes: ...
    def pwrite(self, offset: int, data: Buffer, /) -> None: ...
    @property
    def fenced(self) -> bool: ...

@final
class FileStore(Store):
    """A volume's bytes in a file or block device."""

    def __init__(self, path: str | PathLike[str], *, writable: bool) -> None: ...
    def inject_error(self, offset: int, length: int, errno: int, /) -> None: ...
    def clear_errors(self) -> None: ...

@final
class RbdStore(Store):
    """A volume's bytes in a Ceph RBD image."""

    def __init__(
        self,
        pool: str,
        image: str,
        *,
        conf: str,
        client: str,
        keyring: str | None,
        writable: bool,
    ) -> None: ...
    @staticmethod
    def create(
        pool: str, image: str, size: int, *, conf: str, client: str, keyring: str | None
    ) -> None: ...
    def lock(self) -> bool: ...
    def unlock(self) -> None: ...
    def lock_owners(self) -> list[str]: ...
    def break_lock(self, owner: str, /) -> None: ...
    def read_object(self, name: str, /) -> bytes: ...
    def write_object(self, name: str, data: Buffer, /) -> None: ...

@final
class Volume:
    """A LUKS2 data segment on a store, sealed with AES-XTS."""

    def __init__(
        self,
        store: Store,
        key: Key,
        *,
        data_offset: int,
        size: int,
        sector_size: int,
        iv_tweak: int,
    ) -> None: ...
    @property
    def store(self) -> Store: ...
    @property
    def size(self) -> int: ...
    @property
    def writable(self) -> bool: ...

@final
class Scanner:
    """A connection's request frames, checked against its export."""

    def __init__(self, *, size: int, export_flags: int, max_payload: int) -> None: ...
    @property
    def inflight(self) -> int: ...
    def scan(
        self, buffer: bytearray, start: int, /
    ) -> tuple[int, int, int, int, int, int, int, int, str]: ...
    def answer(self, handle: int, error: int, /) -> bytes: ...

@final
class Counters:
    """Requests, bytes, errors and latencies of one (export, client) pair."""

    def __init__(self) -> None: ...
    def add(self, opcode: int, length: int, error: int, seconds: float, /) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...

def run(
    scanner: Scanner,
    volume: Volume,
    counters: Counters,
    buffer: bytearray,
    start: int,
    room: int,
    payload_room: int,
    /,
) -> tuple[int, bytes, int, int, int, int | str | None, list[Note]]:
    """Answer the request frames at the front of ``buffer`` as one batch:
    (consumed, reply, taken, payload, stop, detail, notes)."""

def flush(
    scanner: Scanner, volume: Volume, counters: Counters, handle: int, /
) -> tuple[int, Note | None]:
    """Run the FLUSH ``run`` stopped at: (error, note).  Its handle stays in
    flight until ``scanner.answer(handle, error)`` makes the reply."""
