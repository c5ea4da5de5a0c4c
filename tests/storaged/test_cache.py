"""The decrypted-sector cache: LRU bound, hit accounting, write coherence."""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from netblk.protocol.constants import BLOCK_SIZE
from storaged.cache import STRIPES, SectorCache
from tests.storaged.cache_model import ModelCache
from tests.storaged.stack import Stack, run, serving


def sector(tag: int) -> bytes:
    return bytes([tag]) * BLOCK_SIZE


def admitted(cache: SectorCache, volume: int, first: int, count: int) -> tuple[int, ...]:
    """Miss twice: the second miss takes the range in."""
    assert cache.lookup(volume, first, count) == (None, None)
    found, admission = cache.lookup(volume, first, count)
    assert found is None and admission is not None
    return admission


def test_a_range_is_taken_in_on_its_second_miss() -> None:
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    assert cache.lookup(1, 10, 2) == (None, None)  # remembered only
    found, admission = cache.lookup(1, 10, 2)
    assert found is None and admission is not None
    assert cache.fill(1, 10, sector(1) + sector(2), admission)
    assert cache.lookup(1, 10, 2) == ([sector(1), sector(2)], None)
    assert cache.lookup(1, 20, 1, admit=False) == (None, None)
    assert cache.lookup(1, 20, 1, admit=False) == (None, None)  # scans never get in


def test_lookup_is_all_or_nothing_and_counts() -> None:
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    assert cache.fill(1, 10, sector(1) + sector(2), admitted(cache, 1, 10, 2))
    assert cache.lookup(1, 10, 2) == ([sector(1), sector(2)], None)
    assert cache.lookup(1, 10, 3)[0] is None
    assert cache.lookup(2, 10, 1)[0] is None  # volumes don't share entries
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 8)
    assert stats.hit_ratio == 2 / 10


def test_remembered_misses_are_bounded_like_the_sectors() -> None:
    cache = SectorCache(4 * BLOCK_SIZE, BLOCK_SIZE)
    for s in range(5):
        assert cache.lookup(1, s, 1) == (None, None)
    assert cache.lookup(1, 0, 1) == (None, None)  # the oldest miss was forgotten
    assert cache.lookup(1, 4, 1)[1] is not None


def test_capacity_is_a_hard_bound_with_lru_eviction() -> None:
    cache = SectorCache(4 * BLOCK_SIZE, BLOCK_SIZE)
    for s in range(4):
        cache.fill(1, s, sector(s), admitted(cache, 1, s, 1))
    assert cache.lookup(1, 0, 1)[0] is not None  # 0 is now most recently used
    cache.fill(1, 9, sector(9), admitted(cache, 1, 9, 1))
    assert cache.lookup(1, 1, 1)[0] is None  # the least recently used went
    assert cache.lookup(1, 0, 1)[0] is not None
    assert cache.stats().used_bytes == 4 * BLOCK_SIZE
    ten = b"".join(sector(s) for s in range(10))
    assert cache.fill(1, 100, ten, admitted(cache, 1, 100, 10))
    assert cache.stats().used_bytes == 4 * BLOCK_SIZE
    assert cache.lookup(1, 106, 4) == ([sector(s) for s in range(6, 10)], None)


def test_a_write_during_a_read_stops_the_stale_fill() -> None:
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    admission = admitted(cache, 1, 5, 2)  # a reader starts reading from disk
    cache.invalidate(1, 6, 1)  # a writer lands on one of its sectors
    assert not cache.fill(1, 5, sector(0) + sector(0), admission)
    assert cache.lookup(1, 5, 2)[0] is None


def test_invalidate_drops_entries_and_large_ranges_bump_every_stripe() -> None:
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    cache.fill(1, 0, sector(1) * 4, admitted(cache, 1, 0, 4))
    cache.fill(2, 0, sector(2), admitted(cache, 2, 0, 1))
    admission = admitted(cache, 1, 1000, 1)
    cache.invalidate(1, 0, STRIPES * 2)
    assert cache.lookup(1, 0, 1)[0] is None
    assert cache.lookup(2, 0, 1)[0] == [sector(2)]  # another volume's sectors stay
    assert not cache.fill(1, 1000, sector(2), admission)


def test_zero_capacity_disables_the_cache() -> None:
    cache = SectorCache(0, BLOCK_SIZE)
    assert cache.lookup(1, 0, 1) == (None, None)
    assert cache.lookup(1, 0, 1) == (None, None)
    assert cache.stats().misses == 0


_SMALL_SECTOR = 16
# A small key space, so that operations meet: ranges of 1-2 sectors among 6
# on two volumes.
_volumes = st.sampled_from([1, 1, 2])
_firsts = st.integers(0, 4)
_counts = st.integers(1, 2)
_operations = st.lists(
    st.one_of(
        # storaged's read path: lookup, then a fill if the range was taken
        # in, with a write landing on its first sector meanwhile if `racing`
        st.tuples(st.just("read"), _volumes, _firsts, _counts, st.booleans(), st.booleans()),
        st.tuples(st.just("read"), _volumes, _firsts, _counts, st.just(False), st.just(False)),
        st.tuples(
            st.just("invalidate"),
            _volumes,
            _firsts,
            st.sampled_from([1, 2, 3, 6, STRIPES + 3]),
        ),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(capacity=st.integers(0, 5), operations=_operations)
# A hit renews a sector: 1 and 2 cached, 1 read again, 3 evicts 2, not 1.
@example(
    capacity=2,
    operations=[("read", 1, sector, 1, False, False) for sector in (1, 1, 2, 2, 1, 3, 3, 1, 2)],
)
def test_the_c_cache_behaves_like_the_python_one(
    capacity: int, operations: list[tuple[object, ...]]
) -> None:
    """storaged/_cache.c against the Python cache it replaced
    (tests/storaged/cache_model.py): same answers, counters and evictions
    for any mix of reads (some of them scans, some raced by a write) and
    invalidations, with a capacity small enough to evict all the time."""
    cache = SectorCache(capacity * _SMALL_SECTOR, _SMALL_SECTOR)
    model = ModelCache(capacity * _SMALL_SECTOR, _SMALL_SECTOR)
    for operation in operations:
        match operation:
            case ("read", volume, first, count, scan, racing):
                answer = cache.lookup(volume, first, count, admit=not scan)
                assert answer == model.lookup(volume, first, count, admit=not scan)
                admission = answer[1]
                if admission is not None:
                    if racing:
                        cache.invalidate(volume, first, 1)
                        model.invalidate(volume, first, 1)
                    data = bytes([first]) * (count * _SMALL_SECTOR)
                    filled = cache.fill(volume, first, data, admission)
                    assert filled == model.fill(volume, first, data, admission)
            case ("invalidate", volume, first, count):
                cache.invalidate(volume, first, count)
                model.invalidate(volume, first, count)
        assert cache.counters() == (model.held, model.hits, model.misses)
        assert cache.keys() == model.keys()  # what each holds, in LRU order


@pytest.mark.parametrize(
    ("volume", "first", "count", "error"),
    [
        (-1, 0, 1, OverflowError),
        (1, -1, 1, OverflowError),
        (1, 0, -1, ValueError),
        (1, (1 << 64) - 1, 1, ValueError),
    ],
)
def test_ranges_outside_64_bit_sectors_are_refused(
    volume: int, first: int, count: int, error: type[Exception]
) -> None:
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    with pytest.raises(error):
        cache.lookup(volume, first, count)
    with pytest.raises(error):
        cache.invalidate(volume, first, count)


def test_the_cache_is_set_up_once() -> None:
    """A second __init__ would reset the generations under admitted reads,
    and a cache never set up has no maps to look in."""
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    admission = admitted(cache, 1, 5, 1)
    cache.invalidate(1, 5, 1)
    with pytest.raises(RuntimeError, match="already"):
        SectorCache.__init__(cache, 16 * BLOCK_SIZE, BLOCK_SIZE)
    assert not cache.fill(1, 5, sector(1), admission)
    bare = SectorCache.__new__(SectorCache)
    with pytest.raises(RuntimeError, match="not initialised"):
        bare.lookup(1, 0, 1)
    with pytest.raises(RuntimeError, match="not initialised"):
        bare.fill(1, 0, sector(1), ())
    with pytest.raises(OverflowError):
        SectorCache(1 << 62, 1)


def test_volume_ids_are_not_bounded() -> None:
    """Every Volume the process opens takes a new id (tests open thousands)."""
    cache = SectorCache(16 * BLOCK_SIZE, BLOCK_SIZE)
    for volume in (1, 1 << 12, 1 << 61):
        assert cache.fill(volume, 7, sector(volume % 251), admitted(cache, volume, 7, 1))
        assert cache.lookup(volume, 7, 1)[0] == [sector(volume % 251)]


def test_server_cache_stays_coherent_and_reports_hits(stack: Stack) -> None:
    async def body() -> None:
        async with serving(stack) as server, await stack.connect() as client:
            first, second = os.urandom(BLOCK_SIZE * 4), os.urandom(BLOCK_SIZE * 4)
            await client.write(0, first)
            assert await client.read(0, len(first)) == first  # miss, remembered
            assert await client.read(0, len(first)) == first  # miss again, fills
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
