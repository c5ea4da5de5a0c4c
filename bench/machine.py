"""Facts about the machine a benchmark ran on, for the report: the same
questions asked of the host and of the guest."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def first_line(*argv: str) -> str:
    """The first line a command prints (a version, say), or "?" if it fails."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in /proc/cpuinfo ("model name", "flags"), or "?"."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return "?"


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU each process has used so far, by name."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        used[name] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return used


@contextlib.contextmanager
def cpu_used(pids: dict[str, int], out: Path) -> Iterator[None]:
    """Add to the run's JSON (``out``) the CPU each process used during it,
    and the machine's total: what bounds a run on two CPUs."""
    before, busy_before = cpu_seconds(pids), _busy_seconds()
    yield
    after, busy_after = cpu_seconds(pids), _busy_seconds()
    report = json.loads(out.read_text())
    report["netblk_bench_cpu_s"] = {name: round(after[name] - before[name], 2) for name in pids}
    report["netblk_bench_cpu_s"]["machine total"] = round(busy_after - busy_before, 2)
    out.write_text(json.dumps(report, indent=1))


def _busy_seconds() -> float:
    """CPU time the machine spent on anything but idle and iowait."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
