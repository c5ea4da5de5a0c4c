"""Loading and unloading netblk.ko in the guest, shared by the VM suites."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

KO = Path(__file__).resolve().parents[2] / "kmod" / "netblk.ko"
SYS_MODULE = Path("/sys/module/netblk")


def loaded() -> bool:
    return SYS_MODULE.exists()


def insmod(**params: object) -> None:
    args = [f"{key}={value}" for key, value in params.items()]
    subprocess.run(["insmod", str(KO), *args], check=True, capture_output=True)


def rmmod() -> None:
    """rmmod, waiting out udev probes that briefly hold a device open."""
    subprocess.run(["udevadm", "settle", "-t", "5"], check=False, capture_output=True)
    for _ in range(50):
        result = subprocess.run(["rmmod", "netblk"], check=False, capture_output=True, text=True)
        if result.returncode == 0:
            return
        if "in use" not in result.stderr:
            break
        time.sleep(0.1)
    raise AssertionError(f"rmmod failed: {result.stderr}")
