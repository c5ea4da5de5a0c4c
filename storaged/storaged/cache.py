"""A bounded LRU cache of decrypted sectors, shared by every volume.

Coherence with writes without holding a lock across disk I/O: every write
bumps the generation of the stripes its sectors map to, and a read may only
fill the cache if none of its stripes moved while it was reading.  So a read
that raced a write can never put the older data back after the write.

Admission on the second miss: a range read once (a random read over a
volume much larger than the cache, a scan) is only remembered, by key; it
is filled when it misses again while remembered.  A one-off read so costs a
dictionary insert instead of a fill that would evict a sector worth keeping,
the way the page cache keeps first-touch pages on its inactive list.
"""

from __future__ import annotations

from dataclasses import dataclass

from storaged._cache import STRIPES, SectorCacheCore

__all__ = ["STRIPES", "Admission", "CacheStats", "SectorCache"]

#: What ``lookup`` hands a read that missed: the stripe generations to give
#: back to ``fill``, or None if the cache does not take these sectors (yet).
Admission = tuple[int, ...] | None


@dataclass(frozen=True)
class CacheStats:
    capacity_bytes: int
    used_bytes: int
    hits: int
    misses: int

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class SectorCache(SectorCacheCore):
    """LRU of ``sector_size``-byte plaintext sectors, ``capacity_bytes`` at most.

    Besides the sectors it remembers the first-sector keys of as many
    missed ranges as it holds sectors (keys only, no data).  A key is a
    volume's id and a sector number.  The bookkeeping is in C
    (``storaged/_cache.c``): every read asks the cache and most random
    reads miss, which in Python cost a 4 KiB READ about a fifth of its time.

    ``lookup(volume, first, count, *, admit=True)``: all ``count`` sectors
    from ``first`` (a hit), or None and, if the range is taken in (``admit``
    and its second miss), its generations.  ``fill(volume, first, data,
    admission)``: insert the sectors of ``data`` read from disk from sector
    ``first``, unless a write overlapped the read (returns whether they went
    in).  ``invalidate(volume, first, count)``: drop sectors that a write,
    trim or zeroing changed on disk.
    """

    def stats(self) -> CacheStats:
        held, hits, misses = self.counters()
        return CacheStats(
            capacity_bytes=self.capacity * self.sector_size,
            used_bytes=held * self.sector_size,
            hits=hits,
            misses=misses,
        )
