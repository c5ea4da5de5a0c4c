"""A bounded LRU cache of decrypted sectors, shared by every volume.

Coherence with writes without holding a lock across disk I/O: every write
bumps the generation of the stripes its sectors map to, and a read may only
fill the cache if none of its stripes moved while it was reading.  So a read
that raced a write can never put the older data back after the write.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

#: Generation stripes; more stripes mean fewer fills lost to unrelated writes.
STRIPES = 1024

SectorKey = tuple[int, int]  # (volume id, sector index)


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


class SectorCache:
    """LRU of ``sector_size``-byte plaintext sectors, ``capacity_bytes`` at most."""

    def __init__(self, capacity_bytes: int, sector_size: int) -> None:
        self.sector_size = sector_size
        self.capacity = capacity_bytes // sector_size
        self._entries: OrderedDict[SectorKey, bytes] = OrderedDict()
        self._generations = [0] * STRIPES
        self._lock = threading.Lock()  # protects _entries, _generations, counters
        self._hits = 0
        self._misses = 0

    @staticmethod
    def _stripe(volume: int, sector: int) -> int:
        return (sector + volume * 7919) % STRIPES

    def lookup(self, volume: int, first: int, count: int) -> list[bytes] | None:
        """All ``count`` sectors from ``first``, or None if any is missing."""
        if not self.capacity:
            return None
        with self._lock:
            found = []
            for sector in range(first, first + count):
                data = self._entries.get((volume, sector))
                if data is None:
                    self._misses += count
                    return None
                found.append(data)
            for sector in range(first, first + count):
                self._entries.move_to_end((volume, sector))
            self._hits += count
            return found

    def snapshot(self, volume: int, first: int, count: int) -> tuple[int, ...]:
        """Generations to hand back to ``fill`` after reading from disk."""
        with self._lock:
            return self._stripe_generations(volume, first, count)

    def _stripe_generations(self, volume: int, first: int, count: int) -> tuple[int, ...]:
        if count >= STRIPES:
            return tuple(self._generations)
        return tuple(
            self._generations[self._stripe(volume, s)] for s in range(first, first + count)
        )

    def fill(
        self, volume: int, first: int, sectors: Sequence[bytes], snapshot: tuple[int, ...]
    ) -> bool:
        """Insert sectors read from disk unless a write overlapped the read."""
        if not self.capacity:
            return False
        with self._lock:
            if self._stripe_generations(volume, first, len(sectors)) != snapshot:
                return False
            for offset, data in enumerate(sectors[-self.capacity :]):
                key = (volume, first + max(0, len(sectors) - self.capacity) + offset)
                self._entries[key] = data
                self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
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
                stale = [
                    k for k in self._entries if k[0] == volume and first <= k[1] < first + count
                ]
            else:
                stale = [(volume, s) for s in range(first, first + count)]
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
