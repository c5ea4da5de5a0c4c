"""The fio profiles every target runs, and what we read back from fio's JSON.

Each profile is one fio job on the raw block device with O_DIRECT and
libaio, time based after a ramp.  fio's default random seed is kept, so every
target sees the same offsets in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    rw: str
    block_size: str
    iodepth: int
    #: fio's rwmixread, for mixed profiles
    read_percent: int | None = None

    @property
    def sequential(self) -> bool:
        return self.rw in ("read", "write")

    def fio_argv(self, device: str, runtime: int, ramp: int) -> list[str]:
        argv = [
            "fio",
            f"--name={self.name}",
            f"--filename={device}",
            f"--rw={self.rw}",
            f"--bs={self.block_size}",
            f"--iodepth={self.iodepth}",
            "--direct=1",
            "--ioengine=libaio",
            "--time_based",
            f"--runtime={runtime}",
            f"--ramp_time={ramp}",
            "--output-format=json",
        ]
        if self.read_percent is not None:
            argv.append(f"--rwmixread={self.read_percent}")
        return argv


PROFILES = (
    Profile("seq-write", "sequential write 1 MiB QD8", "write", "1M", 8),
    Profile("seq-read", "sequential read 1 MiB QD8", "read", "1M", 8),
    Profile("rand-read-qd1", "random read 4 KiB QD1", "randread", "4k", 1),
    Profile("rand-read-qd32", "random read 4 KiB QD32", "randread", "4k", 32),
    Profile("rand-write-qd1", "random write 4 KiB QD1", "randwrite", "4k", 1),
    Profile("rand-write-qd32", "random write 4 KiB QD32", "randwrite", "4k", 32),
    Profile("mix-qd16", "random 70/30 read/write 4 KiB QD16", "randrw", "4k", 16, 70),
)
PROFILE_BY_NAME = {p.name: p for p in PROFILES}
#: netblk on an RBD image against ``rbd bench`` on the same cluster.
RBD_PROFILES = (
    Profile("rand-read-qd16", "random read 4 KiB QD16", "randread", "4k", 16),
    Profile("rand-write-qd16", "random write 4 KiB QD16", "randwrite", "4k", 16),
    Profile("rand-read-qd32", "random read 4 KiB QD32", "randread", "4k", 32),
    Profile("rand-write-qd32", "random write 4 KiB QD32", "randwrite", "4k", 32),
)


@dataclass(frozen=True)
class Measurement:
    """One fio run, both directions added up; latency of the main direction
    (reads for a mix: 70 % of its requests)."""

    mb_per_s: float
    iops: float
    p50_us: float
    p99_us: float

    @classmethod
    def from_fio(cls, report: dict[str, Any]) -> Measurement:
        (job,) = report["jobs"]
        read, write = job["read"], job["write"]
        main = read if read["io_bytes"] >= write["io_bytes"] else write
        percentiles = main["clat_ns"].get("percentile", {})
        return cls(
            mb_per_s=(read["bw_bytes"] + write["bw_bytes"]) / 1e6,
            iops=read["iops"] + write["iops"],
            p50_us=percentiles.get("50.000000", 0) / 1e3,
            p99_us=percentiles.get("99.000000", 0) / 1e3,
        )

    @classmethod
    def median_of(cls, runs: list[Measurement]) -> Measurement:
        return cls(
            mb_per_s=median(r.mb_per_s for r in runs),
            iops=median(r.iops for r in runs),
            p50_us=median(r.p50_us for r in runs),
            p99_us=median(r.p99_us for r in runs),
        )
