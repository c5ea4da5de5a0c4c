"""Runs INSIDE the benchmark guest (bench/run boots it): sets up all four
targets side by side, runs every profile on each, interleaved, and writes
raw fio JSON, storaged's peak RSS per run, a py-spy profile of storaged
under load and the guest's facts into the results directory.

With ``--ab BIN`` it measures netblk alone, twice: as this tree serves it
("new") and with the storaged and tls-bridge in BIN ("old", another
commit's, which bench/run --ab installs), on one volume, in rounds whose
order alternates (new, old, then old, new, ...).

With ``--rbd`` it boots the mini Ceph cluster of tests/ceph_cluster.py in
the guest (memstore: the guest's RAM) and measures netblk served from an
RBD image against ``rbd bench`` on a second image of the same size, random
4 KiB reads and writes at QD16 and QD32, in alternating rounds.

    python bench/guest.py RESULTS [--size 1G] [--runtime 20] [--ramp 3] [--repeat 3]
        [--ab BIN | --rbd [--rbd-ops N]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import targets
from machine import cpu_used, cpuinfo, first_line
from profiles import PROFILE_BY_NAME, PROFILES, Profile
from tests.ceph_cluster import mini_cluster  # on the path targets puts the repository on

#: storaged is sampled for py-spy while this profile runs (one extra run).
PROFILED = PROFILE_BY_NAME["rand-read-qd32"]
TMPFS = Path("/run/netblk-bench")


class RssSampler:
    """Peak resident set size of one process while a run lasts."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self._status = Path(f"/proc/{pid}/status")
        self._interval = interval
        self._stop = threading.Event()
        self.peak_kib = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            for line in self._status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def run_fio(device: targets.Device, profile: Profile, args: argparse.Namespace, out: Path) -> None:
    argv = profile.fio_argv(device.path, args.runtime, args.ramp)
    with contextlib.ExitStack() as stack:
        sampler = None
        if device.server_pid is not None:
            sampler = stack.enter_context(RssSampler(device.server_pid))
        report = json.loads(targets.run(*argv))
    if sampler is not None:
        report["netblk_bench"] = {"storaged_peak_rss_kib": sampler.peak_kib}
    out.write_text(json.dumps(report, indent=1))
    print(f"bench: {out.parent.name}/{out.name} done", flush=True)


def profile_storaged(device: targets.Device, args: argparse.Namespace, results: Path) -> None:
    """py-spy samples storaged while fio drives the profiled workload: the
    raw stacks (for the report's table) and a flame graph, side by side."""
    assert device.server_pid is not None
    argv = PROFILED.fio_argv(device.path, args.runtime, args.ramp)
    seconds = str(max(1, args.runtime - 1))
    spy = [str(targets.VENV_BIN / "py-spy"), "record", "--pid", str(device.server_pid)]
    spy += ["--rate", "97", "--duration", seconds, "--threads", "--nonblocking"]
    outputs = {"raw": "storaged-profile.txt", "flamegraph": "storaged-profile.svg"}
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL):
        time.sleep(args.ramp)
        spies = [
            subprocess.Popen([*spy, "--format", fmt, "--output", str(results / name)])
            for fmt, name in outputs.items()
        ]
        for process in spies:
            if process.wait():
                raise RuntimeError(f"py-spy failed: {process.args!r}")


def facts(results: Path, devices: list[targets.Device]) -> None:
    def package(name: str) -> str:
        return first_line("dpkg-query", "-W", "-f=${Version}", name)

    info = {
        "guest_kernel": platform.release(),
        "guest_cpus": os.cpu_count(),
        "guest_cpu_model": cpuinfo("model name"),
        "guest_cpu_aes": "aes" in cpuinfo("flags").split(),
        "guest_memory_kib": int(Path("/proc/meminfo").read_text().split()[1]),
        "python": sys.version.split()[0],
        "fio": first_line("fio", "--version"),
        "nbd-server": package("nbd-server"),
        "nbd-client": package("nbd-client"),
        "cryptsetup": package("cryptsetup-bin"),
        "openssl": package("openssl"),
        "gnutls": package("libgnutls30"),
        "py-spy": first_line(str(targets.VENV_BIN / "py-spy"), "--version"),
        "targets": {d.name: d.label for d in devices},
        "profiles": {p.name: p.title for p in PROFILES},
        "profiled": PROFILED.title,
    }
    (results / "guest.json").write_text(json.dumps(info, indent=1))


def keep_logs(results: Path) -> None:
    """The servers' logs, for when a target misbehaves."""
    for log in TMPFS.glob("*/*.log"):
        (results / "logs").mkdir(exist_ok=True)
        (results / "logs" / f"{log.parent.name}-{log.name}").write_bytes(log.read_bytes())


def ab(args: argparse.Namespace, results: Path) -> int:
    """netblk as served by this tree and by another commit, interleaved."""
    variants = {"new": targets.VENV_BIN, "old": args.ab}
    pki = targets.Pki.create(TMPFS)
    volume = targets.netblk_volume(TMPFS / "volume", args.size)
    filled = False
    for repeat in range(1, args.repeat + 1):
        order = ["new", "old"] if repeat % 2 else ["old", "new"]
        for variant in order:
            name = f"netblk-{variant}"
            with targets.netblk(
                TMPFS,
                pki,
                args.size,
                name=f"{name}.{repeat}",
                bin_dir=variants[variant],
                made=volume,
            ) as device:
                if not filled:
                    print(f"bench: filling {device.path}", flush=True)
                    targets.fill(device.path)
                    filled = True
                for profile in PROFILES:
                    out = results / "fio" / name / f"{profile.name}.{repeat}.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    run_fio(device, profile, args, out)
    return 0


def rbd(args: argparse.Namespace, results: Path) -> int:
    """netblk on an RBD image against rbd bench, one cluster, one boot."""
    pki = targets.Pki.create(TMPFS)
    work = TMPFS / "volume"
    work.mkdir()
    passphrase = work / "volume.pass"
    passphrase.write_text(targets.PASSPHRASE)
    with mini_cluster(TMPFS / "ceph", "memstore") as ceph:
        location = targets.rbd_images(ceph, args.size, passphrase)
        with targets.netblk(
            TMPFS, pki, args.size, made=(work / "unused", passphrase), location=location
        ) as device:
            facts(results, [device])
            print(f"bench: filling {device.path}", flush=True)
            targets.fill(device.path)
            # No ramp: the CPU time is measured around the whole run (the
            # fill warmed everything up).
            fio_args = argparse.Namespace(**(vars(args) | {"ramp": 0}))
            assert device.server_pid is not None
            pids = {"storaged": device.server_pid}
            pids |= {name: pid for name, pid in ceph.pids.items() if name.startswith("osd")}
            for repeat, profile, target in targets.rbd_rounds(args.repeat):
                out = results / target / f"{profile.name}.{repeat}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                with cpu_used(pids, out):
                    if target == "netblk":
                        run_fio(device, profile, fio_args, out)
                    else:
                        out.write_text(json.dumps(targets.rbd_bench(ceph, profile, args.rbd_ops)))
                        print(f"bench: {target}/{out.name} done", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--size", default="1G", help="each device's size (M or G)")
    parser.add_argument("--runtime", type=int, default=20, help="seconds measured per run")
    parser.add_argument("--ramp", type=int, default=3, help="seconds before measuring")
    parser.add_argument("--repeat", type=int, default=3, help="runs per profile and target")
    parser.add_argument("--ab", type=Path, help="A/B: the old commit's venv bin directory")
    parser.add_argument("--rbd", action="store_true", help="netblk on RBD against rbd bench")
    parser.add_argument("--rbd-ops", type=int, default=4096, help="operations per rbd bench")
    args = parser.parse_args()
    results: Path = args.results
    TMPFS.mkdir(parents=True, exist_ok=True)
    targets.run("mount", "-t", "tmpfs", "-o", "size=90%", "netblk-bench", TMPFS)
    targets.run("modprobe", "-a", "loop", "dm_crypt", "tls", "nbd")
    if args.ab is not None or args.rbd:
        try:
            return ab(args, results) if args.ab is not None else rbd(args, results)
        finally:
            keep_logs(results)
            subprocess.run(["umount", "--lazy", str(TMPFS)], check=False)
    try:
        with contextlib.ExitStack() as stack:
            pki = targets.Pki.create(TMPFS)
            devices = [
                stack.enter_context(targets.netblk(TMPFS, pki, args.size)),
                stack.enter_context(targets.nbd_tls(TMPFS, pki, args.size)),
                stack.enter_context(targets.nbd_plain(TMPFS, args.size)),
                stack.enter_context(targets.loop(TMPFS, args.size)),
            ]
            facts(results, devices)
            for device in devices:
                print(f"bench: filling {device.name} ({device.path})", flush=True)
                targets.fill(device.path)
            # Interleaved, so a slow minute on the host hurts every target alike.
            for repeat in range(1, args.repeat + 1):
                for profile in PROFILES:
                    for device in devices:
                        out = results / "fio" / device.name / f"{profile.name}.{repeat}.json"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        run_fio(device, profile, args, out)
            profile_storaged(devices[0], args, results)
    finally:
        keep_logs(results)
        subprocess.run(["umount", "--lazy", str(TMPFS)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
