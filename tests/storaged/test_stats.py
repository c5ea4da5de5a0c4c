"""storaged.stats: what a batch of requests adds to the counters operators see."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netblk.protocol.constants import Cmd, Errno
from storaged._requests import tally
from storaged.stats import LATENCY_BUCKETS, IoCounters, RequestRecord, ServerStats


def timed(*seconds: float) -> list[RequestRecord]:
    """READs that took ``seconds`` each."""
    return [(Cmd.READ, 4096, Errno.OK, None, taken) for taken in seconds]


def test_latency_histogram_buckets_are_powers_of_two_of_microseconds() -> None:
    counters = IoCounters()
    counters.record(timed(0.0, 0.000_001, 0.000_003, 0.000_004, 0.001, 3600.0))
    histogram = counters.latency
    assert histogram.buckets[0] == 2  # 0 s counts as 1 us
    assert histogram.buckets[1] == 1  # 3 us
    assert histogram.buckets[2] == 1  # 4 us
    assert histogram.buckets[9] == 1  # 1000 us
    assert histogram.buckets[LATENCY_BUCKETS - 1] == 1  # beyond the last bound
    assert sum(histogram.buckets) == histogram.count == 6
    assert histogram.total_us == 1 + 1 + 3 + 4 + 1000 + 3_600_000_000
    assert histogram.max_us == 3_600_000_000
    counters.record(timed(0.000_002))
    assert (histogram.count, histogram.max_us, histogram.buckets[1]) == (7, 3_600_000_000, 2)


def test_latency_percentiles_are_bucket_bounds_capped_by_the_maximum() -> None:
    counters = IoCounters()
    counters.record(timed(*[0.000_010] * 98, 0.005, 0.006))
    stats = counters.latency.as_dict()
    assert stats["p50_us"] == 16  # 10 us lies in [8, 16)
    assert stats["p99_us"] == 6000  # bucket [4096, 8192), capped by the max
    assert (stats["count"], stats["max_us"], stats["mean_us"]) == (100, 6000, 119)


def reference_tally(
    records: list[RequestRecord], buckets: list[int]
) -> tuple[dict[Cmd, int], int, int, int, int, int, int, int, int]:
    """What tally() must return, the way IoCounters counted in Python."""
    ops: Counter[Cmd] = Counter()
    read = written = errors = hits = misses = total = peak = 0
    for op, length, error, cache_hit, seconds in records:
        ops[op] += 1
        if error:
            errors += 1
        elif op is Cmd.READ:
            read += length
        elif op is Cmd.WRITE:
            written += length
        if cache_hit is True:
            hits += 1
        elif cache_hit is False:
            misses += 1
        micros = int(seconds * 1_000_000) or 1
        buckets[min(micros.bit_length() - 1, len(buckets) - 1)] += 1
        total += micros
        peak = max(peak, micros)
    return dict(ops), read, written, errors, hits, misses, len(records), total, peak


records = st.lists(
    st.tuples(
        st.sampled_from(list(Cmd)),
        st.integers(0, 1 << 40),
        st.sampled_from(list(Errno)),
        st.sampled_from([None, True, False]),
        st.floats(0, 1e9, allow_nan=False) | st.sampled_from([0.0, 1e-6, 2e-6 - 1e-12]),
    ),
    max_size=40,
)


@given(records, st.integers(1, 64))
def test_tally_counts_a_batch_as_the_python_reference_does(
    batch: list[RequestRecord], nbuckets: int
) -> None:
    seeded = list(range(nbuckets))  # counts are added to what is there
    in_c, in_python = list(seeded), list(seeded)
    assert tally(batch, in_c) == reference_tally(batch, in_python)
    assert in_c == in_python


def test_every_opcode_can_be_counted() -> None:
    ops, *_ = tally([(cmd, 0, Errno.OK, None, 0.0) for cmd in Cmd], [0])
    assert ops == dict.fromkeys(Cmd, 1)


@pytest.mark.parametrize(
    ("record", "buckets", "error"),
    [
        ((Cmd.READ, 4096, Errno.OK, None, -0.5), [0], "negative or out of range"),
        ((Cmd.READ, 4096, Errno.OK, None, float("nan")), [0], "negative or out of range"),
        ((Cmd.READ, 4096, Errno.OK, None, 1e13), [0], "negative or out of range"),
        ((max(Cmd) + 1, 4096, Errno.OK, None, 0.0), [0], "no opcode"),
        ((Cmd.READ, -1, Errno.OK, None, 0.0), [0], "negative"),
        ((Cmd.READ, 4096, Errno.OK, None), [0], "a record is"),
        ((Cmd.READ, 4096, Errno.OK, None, 0.0), [0.0], "not an int"),
        ((Cmd.READ, 4096, Errno.OK, None, 0.0), [], "buckets"),
        ((Cmd.READ, 4096, Errno.OK, None, 0.0), [0] * 65, "buckets"),
    ],
)
def test_tally_refuses_what_is_not_a_record(
    record: tuple[object, ...], buckets: list[int], error: str
) -> None:
    with pytest.raises((ValueError, TypeError, OverflowError), match=error):
        tally([record], buckets)  # type: ignore[list-item]


def test_a_batch_counts_ops_bytes_errors_and_cache_outcomes() -> None:
    counters = IoCounters()
    counters.record(
        [
            (Cmd.READ, 4096, Errno.OK, True, 0.000_1),
            (Cmd.READ, 8192, Errno.OK, False, 0.000_2),
            (Cmd.READ, 4096, Errno.IO, False, 0.000_3),  # failed: no bytes
            (Cmd.WRITE, 65536, Errno.OK, None, 0.000_4),
            (Cmd.WRITE, 4096, Errno.NOSPC, None, 0.000_5),
            (Cmd.FLUSH, 0, Errno.OK, None, 0.002),
        ]
    )
    counters.record([(Cmd.TRIM, 1 << 20, Errno.OK, None, 0.000_1)])
    assert counters.requests == {"read": 3, "write": 2, "flush": 1, "trim": 1}
    assert (counters.bytes_read, counters.bytes_written) == (12288, 65536)
    assert counters.errors == 2
    assert (counters.cache_hits, counters.cache_misses) == (1, 2)
    assert counters.latency.count == 7
    assert counters.latency.max_us == 2000


def test_snapshot_sums_each_export_and_each_client() -> None:
    stats = ServerStats()
    stats.record_requests("data", "alice", [(Cmd.READ, 4096, Errno.OK, False, 0.001)])
    stats.record_requests("data", "bob", [(Cmd.WRITE, 8192, Errno.OK, None, 0.001)] * 2)
    stats.record_requests("other", "alice", [(Cmd.WRITE, 4096, Errno.OK, None, 0.001)])
    stats.record_refusal("other", "alice")
    snap = stats.snapshot()
    data, other = snap["exports"]["data"], snap["exports"]["other"]
    assert data["requests"] == {"read": 1, "write": 2}
    assert (data["bytes_read"], data["bytes_written"]) == (4096, 16384)
    assert other["requests"] == {"refused": 1, "write": 1}
    assert other["errors"] == 1
    alice = snap["clients"]["alice"]
    assert alice["requests_total"] == 3
    assert (alice["bytes_read"], alice["bytes_written"]) == (4096, 4096)
    assert alice["latency"]["count"] == 2  # refusals have no latency
    assert snap["clients"]["bob"]["cache_misses"] == 0
