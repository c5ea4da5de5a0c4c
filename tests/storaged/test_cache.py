"""The decrypted-sector cache: LRU bound, hit accounting, write coherence."""

from __future__ import annotations

import os

from storaged.cache import STRIPES, SectorCache
from storaged.protocol.constants import BLOCK_SIZE
from tests.storaged.stack import Stack, run, serving


def sector(tag: int) -> bytes:
    return bytes([tag]) * BLOCK_SIZE


def test_lookup_is_all_or_nothing_and_counts() -> None:
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    assert cache.fill(1, 10, [sector(1), sector(2)], cache.snapshot(1, 10, 2))
    assert cache.lookup(1, 10, 2) == [sector(1), sector(2)]
    assert cache.lookup(1, 10, 3) is None
    assert cache.lookup(2, 10, 1) is None  # volumes don't share entries
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 4)
    assert stats.hit_ratio == 2 / 6


def test_capacity_is_a_hard_bound_with_lru_eviction() -> None:
    cache = SectorCache(4 * BLOCK_SIZE, BLOCK_SIZE)
    for s in range(4):
        cache.fill(1, s, [sector(s)], cache.snapshot(1, s, 1))
    assert cache.lookup(1, 0, 1) is not None  # 0 is now most recently used
    cache.fill(1, 9, [sector(9)], cache.snapshot(1, 9, 1))
    assert cache.lookup(1, 1, 1) is None  # the least recently used went
    assert cache.lookup(1, 0, 1) is not None
    assert cache.stats().used_bytes == 4 * BLOCK_SIZE
    cache.fill(1, 100, [sector(s) for s in range(10)], cache.snapshot(1, 100, 10))
    assert cache.stats().used_bytes == 4 * BLOCK_SIZE


def test_a_write_during_a_read_stops_the_stale_fill() -> None:
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    snapshot = cache.snapshot(1, 5, 2)  # a reader starts reading from disk
    cache.invalidate(1, 6, 1)  # a writer lands on one of its sectors
    assert not cache.fill(1, 5, [sector(0), sector(0)], snapshot)
    assert cache.lookup(1, 5, 2) is None


def test_invalidate_drops_entries_and_large_ranges_bump_every_stripe() -> None:
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    cache.fill(1, 0, [sector(1)] * 4, cache.snapshot(1, 0, 4))
    snapshot = cache.snapshot(1, 1000, 1)
    cache.invalidate(1, 0, STRIPES * 2)
    assert cache.lookup(1, 0, 1) is None
    assert not cache.fill(1, 1000, [sector(2)], snapshot)


def test_zero_capacity_disables_the_cache() -> None:
    cache = SectorCache(0, BLOCK_SIZE)
    assert not cache.fill(1, 0, [sector(1)], cache.snapshot(1, 0, 1))
    assert cache.lookup(1, 0, 1) is None


def test_server_cache_stays_coherent_and_reports_hits(stack: Stack) -> None:
    async def body() -> None:
        async with serving(stack) as server, await stack.connect() as client:
            first, second = os.urandom(BLOCK_SIZE * 4), os.urandom(BLOCK_SIZE * 4)
            await client.write(0, first)
            assert await client.read(0, len(first)) == first  # miss, fills
            assert await client.read(0, len(first)) == first  # hit
            await client.write(BLOCK_SIZE, second[:BLOCK_SIZE])
            expected = first[:BLOCK_SIZE] + second[:BLOCK_SIZE] + first[2 * BLOCK_SIZE :]
            assert await client.read(0, len(first)) == expected
            await client.trim(0, BLOCK_SIZE)
            assert await client.read(0, BLOCK_SIZE) == bytes(BLOCK_SIZE)
            snap = server.snapshot()
            assert snap["exports"]["data"]["cache_hits"] == 1
            assert snap["clients"]["alice"]["cache_hits"] == 1
            assert snap["cache"]["hits"] == 4
            assert 0 < snap["cache"]["hit_ratio"] < 1

    run(body())
