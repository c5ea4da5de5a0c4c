"""The sector cache as it was in Python (storaged/cache.py before it moved to
C in storaged/_cache.c), kept as the reference the C version must match
(tests/storaged/test_cache.py runs both on the same operations)."""

from __future__ import annotations

from collections import OrderedDict

from storaged.cache import STRIPES, Admission

#: Keys are ``volume << SECTOR_BITS | sector``: one int hashes faster than a tuple.
SECTOR_BITS = 52


def _key(volume: int, sector: int) -> int:
    return volume << SECTOR_BITS | sector


class ModelCache:
    """Same contract as storaged.cache.SectorCache; no lock (one thread)."""

    def __init__(self, capacity_bytes: int, sector_size: int) -> None:
        self.sector_size = sector_size
        self.capacity = capacity_bytes // sector_size
        self._entries: OrderedDict[int, bytes] = OrderedDict()
        self._missed: OrderedDict[int, None] = OrderedDict()
        self._generations = [0] * STRIPES
        self.hits = 0
        self.misses = 0

    @property
    def held(self) -> int:
        return len(self._entries)

    def keys(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Cached sectors and missed ranges, least recently used first."""
        mask = (1 << SECTOR_BITS) - 1
        return (
            [(key >> SECTOR_BITS, key & mask) for key in self._entries],
            [(key >> SECTOR_BITS, key & mask) for key in self._missed],
        )

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
        entries = self._entries
        found = []
        for sector in range(first, first + count):
            data = entries.get(_key(volume, sector))
            if data is None:
                self.misses += count
                return None, self._admit(volume, first, count) if admit else None
            found.append(data)
        for sector in range(first, first + count):
            entries.move_to_end(_key(volume, sector))
        self.hits += count
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
