"""A connection's plain READs and WRITEs, and their statistics, in C
(storaged/storaged/_requests.c)."""

from typing import final

from netblk.protocol.constants import Cmd, Errno
from storaged._cache import SectorCacheCore
from storaged._xts import Key
from storaged.stats import RequestRecord

@final
class Runner:
    """Runs the leading plain READ and WRITE frames of a receive buffer."""

    def __init__(
        self,
        *,
        key: Key,
        cache: SectorCacheCore,
        volume_id: int,
        fd: int,
        data_offset: int,
        sector_size: int,
        iv_tweak: int,
        export_size: int,
        max_payload: int,
        writable: bool,
        cache_max_read: int,
        read_op: Cmd,
        write_op: Cmd,
        ok: Errno,
    ) -> None: ...
    def run(
        self,
        buffer: bytearray,
        start: int,
        inflight: set[int],
        room: int,
        payload_room: int,
        replies: list[bytes],
        records: list[RequestRecord],
        /,
    ) -> tuple[int, int, int]: ...

def tally(
    records: list[RequestRecord], buckets: list[int], /
) -> tuple[dict[Cmd, int], int, int, int, int, int, int, int, int]:
    """Sum a batch of statistics records in one pass; counts latencies into
    ``buckets`` in place.  (requests by op, bytes_read, bytes_written, errors,
    cache_hits, cache_misses, count, total_us, max_us)."""
