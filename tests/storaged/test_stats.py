"""storaged.stats and the engine's Counters: what requests add to the
counters operators see."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netblk.protocol.constants import Cmd, Errno
from storaged._engine import Counters
from storaged.stats import LATENCY_BUCKETS, IoCounters, ServerStats


def timed(*seconds: float) -> Counters:
    """READs that took ``seconds`` each."""
    counters = Counters()
    for taken in seconds:
        counters.add(Cmd.READ, 4096, Errno.OK, taken)
    return counters


def test_latency_histogram_buckets_are_powers_of_two_of_microseconds() -> None:
    counters = timed(0.0, 0.000_001, 0.000_003, 0.000_004, 0.001, 3600.0)
    histogram = IoCounters.of(counters).latency
    assert histogram.buckets[0] == 2  # 0 s counts as 1 us
    assert histogram.buckets[1] == 1  # 3 us
    assert histogram.buckets[2] == 1  # 4 us
    assert histogram.buckets[9] == 1  # 1000 us
    assert histogram.buckets[LATENCY_BUCKETS - 1] == 1  # beyond the last bound
    assert sum(histogram.buckets) == histogram.count == 6
    assert histogram.total_us == 1 + 1 + 3 + 4 + 1000 + 3_600_000_000
    assert histogram.max_us == 3_600_000_000
    counters.add(Cmd.READ, 4096, Errno.OK, 0.000_002)
    histogram = IoCounters.of(counters).latency
    assert (histogram.count, histogram.max_us, histogram.buckets[1]) == (7, 3_600_000_000, 2)


def test_latency_percentiles_are_bucket_bounds_capped_by_the_maximum() -> None:
    stats = IoCounters.of(timed(*[0.000_010] * 98, 0.005, 0.006)).latency.as_dict()
    assert stats["p50_us"] == 16  # 10 us lies in [8, 16)
    assert stats["p99_us"] == 6000  # bucket [4096, 8192), capped by the max
    assert (stats["count"], stats["max_us"], stats["mean_us"]) == (100, 6000, 119)


def reference(records: list[tuple[Cmd, int, Errno, float]]) -> dict[str, object]:
    """What Counters must say, counted the way IoCounters counted in Python."""
    ops: Counter[int] = Counter()
    buckets = [0] * LATENCY_BUCKETS
    read = written = errors = total = peak = 0
    for op, length, error, seconds in records:
        ops[int(op)] += 1
        if error:
            errors += 1
        elif op is Cmd.READ:
            read += length
        elif op is Cmd.WRITE:
            written += length
        micros = int(seconds * 1_000_000) or 1
        buckets[min(micros.bit_length() - 1, LATENCY_BUCKETS - 1)] += 1
        total += micros
        peak = max(peak, micros)
    return {
        "requests": dict(ops),
        "refused": 0,
        "bytes_read": read,
        "bytes_written": written,
        "errors": errors,
        "latency": {"buckets": buckets, "count": len(records), "total_us": total, "max_us": peak},
    }


records = st.lists(
    st.tuples(
        st.sampled_from(list(Cmd)),
        st.integers(0, 2**32 - 1),
        st.sampled_from(list(Errno)),
        st.floats(0, 1e9, allow_nan=False) | st.sampled_from([0.0, 1e-6, 2e-6 - 1e-12]),
    ),
    max_size=40,
)


@given(records)
def test_counters_count_as_the_python_reference_does(
    batch: list[tuple[Cmd, int, Errno, float]],
) -> None:
    counters = Counters()
    for op, length, error, seconds in batch:
        counters.add(op, length, error, seconds)
    assert counters.snapshot() == reference(batch)


def test_a_clock_that_went_back_still_counts_one_microsecond() -> None:
    counters = Counters()
    counters.add(Cmd.READ, 4096, Errno.OK, -0.5)
    counters.add(Cmd.READ, 4096, Errno.OK, float("nan"))
    latency = counters.snapshot()["latency"]
    assert (latency["count"], latency["total_us"], latency["buckets"][0]) == (2, 2, 2)


@pytest.mark.parametrize("opcode", [len(Cmd), 2**16, -1])
def test_an_opcode_the_protocol_lacks_is_refused(opcode: int) -> None:
    with pytest.raises((ValueError, OverflowError)):
        Counters().add(opcode, 0, 0, 0.0)


def test_a_batch_counts_ops_bytes_and_errors() -> None:
    counters = Counters()
    for op, length, error in [
        (Cmd.READ, 4096, Errno.OK),
        (Cmd.READ, 8192, Errno.OK),
        (Cmd.READ, 4096, Errno.IO),  # failed: no bytes
        (Cmd.WRITE, 65536, Errno.OK),
        (Cmd.WRITE, 4096, Errno.NOSPC),
        (Cmd.FLUSH, 0, Errno.OK),
        (Cmd.TRIM, 1 << 20, Errno.OK),
    ]:
        counters.add(op, length, error, 0.000_1)
    counted = IoCounters.of(counters)
    assert counted.requests == {"read": 3, "write": 2, "flush": 1, "trim": 1}
    assert (counted.bytes_read, counted.bytes_written) == (12288, 65536)
    assert counted.errors == 2
    assert counted.latency.count == 7


def test_snapshot_sums_each_export_and_each_client() -> None:
    stats = ServerStats()
    stats.counters("data", "alice").add(Cmd.READ, 4096, Errno.OK, 0.001)
    for _ in range(2):
        stats.counters("data", "bob").add(Cmd.WRITE, 8192, Errno.OK, 0.001)
    stats.counters("other", "alice").add(Cmd.WRITE, 4096, Errno.OK, 0.001)
    assert stats.counters("data", "bob") is stats.counters("data", "bob")
    snap = stats.snapshot()
    data, other = snap["exports"]["data"], snap["exports"]["other"]
    assert data["requests"] == {"read": 1, "write": 2}
    assert (data["bytes_read"], data["bytes_written"]) == (4096, 16384)
    assert other["requests"] == {"write": 1}
    alice = snap["clients"]["alice"]
    assert alice["requests_total"] == 2
    assert (alice["bytes_read"], alice["bytes_written"]) == (4096, 4096)
    assert alice["latency"]["count"] == 2
