"""Facts about the machine a benchmark ran on, for the report: the same
questions asked of the host and of the guest."""

from __future__ import annotations

import subprocess
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
