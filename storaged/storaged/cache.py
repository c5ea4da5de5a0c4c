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

import threading
from collections import OrderedDict
from dataclasses import dataclass

#: Generation stripes; more stripes mean fewer fills lost to unrelated writes.
STRIPES = 1024
#: Keys are ``volume << SECTOR_BITS | sector``: one int hashes faster than a tuple.
SECTOR_BITS = 52

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


def _key(volume: int, sector: int) -> int:
    return volume << SECTOR_BITS | sector


class SectorCache:
    """LRU of ``sector_size``-byte plaintext sectors, ``capacity_bytes`` at most.

    Besides the sectors it remembers the first-sector keys of as many
    missed ranges as it holds sectors (keys only, no data).
    """

    def __init__(self, capacity_bytes: int, sector_size: int) -> None:
        self.sector_size = sector_size
        self.capacity = capacity_bytes // sector_size
        self._entries: OrderedDict[int, bytes] = OrderedDict()
        self._missed: OrderedDict[int, None] = OrderedDict()
        self._generations = [0] * STRIPES
        self._lock = threading.Lock()  # protects everything above and the counters
        self._hits = 0
        self._misses = 0

    @staticmethod
    def _stripe(volume: int, sector: int) -> int:
        return (sector + volume * 7919) % STRIPES

    def lookup(
        self, volume: int, first: int, count: int, *, admit: bool = True
    ) -> tuple[list[bytes] | None, Admission]:
        """All ``count`` sectors from ``first`` (a hit), or None and, if the
        range is taken in (``admit`` and its second miss), its generations."""
        if not self.capacity:
            return None, None
        with self._lock:
            entries = self._entries
            found = []
            for sector in range(first, first + count):
                data = entries.get(_key(volume, sector))
                if data is None:
                    self._misses += count
                    return None, self._admit(volume, first, count) if admit else None
                found.append(data)
            for sector in range(first, first + count):
                entries.move_to_end(_key(volume, sector))
            self._hits += count
            return found, None

    def _admit(self, volume: int, first: int, count: int) -> Admission:
        key = _key(volume, first)
        if key in self._missed:
            del self._missed[key]
            return self._stripe_generations(volume, first, count)
        self._missed[key] = None
        if len(self._missed) > self.capacity:
            self._missed.popitem(last=False)
        return None

    def _stripe_generations(self, volume: int, first: int, count: int) -> tuple[int, ...]:
        if count >= STRIPES:
            return tuple(self._generations)
        return tuple(
            self._generations[self._stripe(volume, s)] for s in range(first, first + count)
        )

    def fill(self, volume: int, first: int, data: bytes, admission: tuple[int, ...]) -> bool:
        """Insert the sectors of ``data`` read from disk from sector ``first``,
        unless a write overlapped the read."""
        size = self.sector_size
        skip = max(0, len(data) // size - self.capacity)  # only the last ones fit
        sectors = [data[i : i + size] for i in range(skip * size, len(data), size)]
        with self._lock:
            if self._stripe_generations(volume, first, len(data) // size) != admission:
                return False
            entries = self._entries
            for offset, sector in enumerate(sectors, first + skip):
                key = _key(volume, offset)
                entries[key] = sector
                entries.move_to_end(key)
            while len(entries) > self.capacity:
                entries.popitem(last=False)
            return True

    def invalidate(self, volume: int, first: int, count: int) -> None:
        """Drop sectors that a write, trim or zeroing changed on disk."""
        with self._lock:
            if count >= STRIPES:
                self._generations = [g + 1 for g in self._generations]
            else:
                for sector in range(first, first + count):
                    self._generations[self._stripe(volume, sector)] += 1
            if not self._entries:
                return
            if count > len(self._entries):
                low, high = _key(volume, first), _key(volume, first + count)
                stale = [key for key in self._entries if low <= key < high]
            else:
                stale = [_key(volume, s) for s in range(first, first + count)]
            for key in stale:
                self._entries.pop(key, None)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                capacity_bytes=self.capacity * self.sector_size,
                used_bytes=len(self._entries) * self.sector_size,
                hits=self._hits,
                misses=self._misses,
            )
