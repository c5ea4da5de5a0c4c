"""Turn a benchmark run's raw results into docs/performance.md and a chart.

    python bench/report.py host RESULTS          # record the host's facts
    python bench/report.py render RESULTS --doc docs/performance.md --chart docs/performance.png
    python bench/report.py ab RESULTS --old REV  # an A/B run's table (bench/run --ab REV)

``render`` rewrites only the part of the document between the
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers (creating the
document if needed), so the analysis written around the numbers stays.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # headless: picks the Agg backend
from machine import cpuinfo, first_line
from profiles import PROFILES, RBD_PROFILES, Measurement, Profile

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TARGETS = ("netblk", "nbd-tls", "nbd", "loop")
#: Goals from the benchmark issue: netblk / peer, per profile.
NBD_TLS_GOAL = 1.5
NBD_TLS_GOAL_PROFILES = ("seq-write", "seq-read", "rand-read-qd32", "rand-write-qd32")
NBD_GOAL = 0.8
#: Frames shown from the py-spy profile.
TOP_FRAMES = 15


#: What a run rewrites; changes there do not make the measured tree dirty.
BENCH_OUTPUTS = ("bench/results", "docs/performance.md", "docs/performance.png")


def git_revision() -> str:
    """The commit measured, "-dirty" if tracked files other than the
    run's own outputs differ from it."""
    outputs = [f":(exclude){path}" for path in BENCH_OUTPUTS]
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    revision = first_line("git", "rev-parse", "--short", "HEAD")
    return f"{revision}-dirty" if changed.strip() else revision


def host_facts(results: Path) -> None:
    facts = {
        "host_cpu_model": cpuinfo("model name"),
        "host_cpus": os.cpu_count(),
        "host_memory_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1
        ),
        "host_kernel": platform.release(),
        "qemu": first_line("qemu-system-x86_64", "--version"),
        "virtme-ng": first_line("vng", "--version"),
        "git": git_revision(),
    }
    (results / "host.json").write_text(json.dumps(facts, indent=1))


Reports = dict[str, dict[str, list[dict[str, Any]]]]


def load(results: Path) -> Reports:
    """target -> profile -> fio's JSON report of each repeat."""
    reports: Reports = collections.defaultdict(dict)
    for target in TARGETS:
        for profile in PROFILES:
            files = sorted((results / "fio" / target).glob(f"{profile.name}.*.json"))
            reports[target][profile.name] = [json.loads(f.read_text()) for f in files]
    return reports


def peak_rss_kib(netblk: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """profile -> storaged's peak RSS over its repeats (guest.py adds it)."""
    return {
        profile: max(r.get("netblk_bench", {}).get("storaged_peak_rss_kib", 0) for r in runs)
        for profile, runs in netblk.items()
        if runs
    }


def headline(profile: Profile, m: Measurement) -> float:
    """The figure a profile is judged by: MB/s sequential, IOPS random."""
    return m.mb_per_s if profile.sequential else m.iops


def top_frames(results: Path) -> list[tuple[str, float, float]]:
    """(frame, self %, total %) from py-spy's raw (collapsed) output."""
    raw = results / "storaged-profile.txt"
    if not raw.exists():
        return []
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        # py-spy --threads puts the thread first: drop it from the frames
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return [
        (frame, 100 * n / samples, 100 * total[frame] / samples)
        for frame, n in own.most_common(TOP_FRAMES)
    ]


def chart(medians: dict[str, dict[str, Measurement]], path: Path) -> None:
    sequential = [p for p in PROFILES if p.sequential]
    random_ = [p for p in PROFILES if not p.sequential]
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [len(sequential), len(random_)]}
    )
    width = 0.8 / len(TARGETS)
    for ax, group, unit in ((axes[0], sequential, "MB/s"), (axes[1], random_, "IOPS")):
        for i, target in enumerate(TARGETS):
            values = [headline(p, medians[target][p.name]) for p in group]
            xs = [x + (i - (len(TARGETS) - 1) / 2) * width for x in range(len(group))]
            ax.bar(xs, values, width, label=target)
        ax.set_xticks(range(len(group)), [p.name for p in group], rotation=20)
        ax.set_ylabel(f"{unit} (median)")
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("netblk vs NBD with TLS + dm-crypt vs plain NBD vs loop (same guest, same tmpfs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def render(results: Path, chart_path: Path, doc: Path) -> str:
    reports = load(results)
    runs = {
        t: {p: [Measurement.from_fio(r) for r in rs] for p, rs in by.items()}
        for t, by in reports.items()
    }
    medians = {
        t: {p: Measurement.median_of(ms) for p, ms in by.items() if ms} for t, by in runs.items()
    }
    guest = json.loads((results / "guest.json").read_text())
    host_file = results / "host.json"
    host = json.loads(host_file.read_text()) if host_file.exists() else {}
    repeats = {len(ms) for by in runs.values() for ms in by.values()}
    chart(medians, chart_path)
    rel = os.path.relpath

    out = [BEGIN, ""]
    out.append(
        f"Raw fio JSON: [`{rel(results, doc.parent)}/fio/`]"
        f"({rel(results, doc.parent)}/fio/); runs per profile and target: "
        f"{', '.join(map(str, sorted(repeats)))} (median shown)."
    )
    out += ["", f"![chart]({rel(chart_path, doc.parent)})", ""]

    out += [
        "### Goals",
        "",
        "| goal | profile | netblk | peer | ratio | met |",
        "|---|---|---|---|---|---|",
    ]
    for profile in PROFILES:
        net = headline(profile, medians["netblk"][profile.name])
        unit = "MB/s" if profile.sequential else "IOPS"
        checks = [("nbd", NBD_GOAL)]
        if profile.name in NBD_TLS_GOAL_PROFILES:
            checks.insert(0, ("nbd-tls", NBD_TLS_GOAL))
        for peer, goal in checks:
            other = headline(profile, medians[peer][profile.name])
            met = "yes" if other and net / other >= goal else "**no**"
            out.append(
                f"| >= {goal}x {peer} | {profile.name} | {net:,.0f} {unit} | "
                f"{other:,.0f} {unit} | {ratio(net, other)} | {met} |"
            )
    peaks = peak_rss_kib(reports["netblk"])
    if peaks:
        worst = max(peaks.values())
        out += [
            "",
            f"storaged peak RSS over every profile: **{worst / 1024:.0f} MiB** "
            f"(per profile: "
            + ", ".join(f"{p} {k / 1024:.0f}" for p, k in peaks.items())
            + " MiB).",
        ]

    out += ["", "### Every profile", ""]
    out += [
        "| profile | target | MB/s | IOPS | p50 µs | p99 µs | vs nbd-tls | vs nbd | vs loop |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for profile in PROFILES:
        for target in TARGETS:
            m = medians[target][profile.name]
            h = headline(profile, m)
            ratios = [
                ratio(h, headline(profile, medians[p][profile.name]))
                for p in ("nbd-tls", "nbd", "loop")
            ]
            out.append(
                f"| {profile.title} | {target} | {m.mb_per_s:,.1f} | {m.iops:,.0f} | "
                f"{m.p50_us:,.0f} | {m.p99_us:,.0f} | " + " | ".join(ratios) + " |"
            )
    out += ["", "Latency is fio's completion latency of the main direction (reads for the mix)."]

    frames = top_frames(results)
    if frames:
        out += ["", f"### storaged under load (py-spy, {guest.get('profiled', '?')})", ""]
        svg = f"{rel(results, doc.parent)}/storaged-profile.svg"
        out += [
            f"Flame graph: [`storaged-profile.svg`]({svg})."
            " Self = samples in the frame itself; total = with what it calls; all threads.",
            "",
            "| frame | self % | total % |",
            "|---|---:|---:|",
        ]
        out += [f"| `{f}` | {s:.1f} | {t:.1f} |" for f, s, t in frames]

    out += ["", "### Machine and versions", "", "| | |", "|---|---|"]
    for key, value in (host | guest).items():
        if key not in ("targets", "profiles", "profiled"):
            out.append(f"| {key} | {value} |")
    out += ["", END]
    return "\n".join(out)


def ab_table(results: Path, old: str) -> str:
    """Markdown: each profile's runs of the new and old netblk, in the order
    they ran, the medians' ratio and whether the two sets of runs overlap
    (a difference inside the runs' spread is not a difference)."""
    new = json.loads((results / "host.json").read_text())["git"]  # as the run began
    lines = [
        f"| profile | new ({new}) | old ({old}) | new / old (medians) | beyond the spread |",
        "|---|---:|---:|---:|---|",
    ]
    for profile in PROFILES:
        runs = {}
        for variant in ("new", "old"):
            files = sorted((results / "fio" / f"netblk-{variant}").glob(f"{profile.name}.*.json"))
            runs[variant] = [
                headline(profile, Measurement.from_fio(json.loads(f.read_text()))) for f in files
            ]
        if not runs["new"] or not runs["old"]:
            continue
        unit = "MB/s" if profile.sequential else "IOPS"
        low, high = min(runs["new"]), max(runs["new"])
        if high < min(runs["old"]):
            verdict = "slower"
        elif low > max(runs["old"]):
            verdict = "faster"
        else:
            verdict = "no"
        median_new, median_old = statistics.median(runs["new"]), statistics.median(runs["old"])
        lines.append(
            f"| {profile.title} | {' / '.join(f'{v:,.0f}' for v in runs['new'])} {unit} "
            f"| {' / '.join(f'{v:,.0f}' for v in runs['old'])} "
            f"| {median_new / median_old:.2f} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def rbd_table(results: Path, label: str) -> str:
    """Markdown: netblk on an RBD image (``label`` says through what) against
    rbd bench on the same cluster, each profile's runs in the order they ran,
    the medians' ratio, and the CPU each process spent per request."""
    lines = [
        f"| profile | {label} (IOPS) | rbd bench (IOPS) | netblk / rbd bench (medians) |",
        "|---|---:|---:|---:|",
    ]
    for profile in RBD_PROFILES:
        netblk, rbd = (
            [
                _iops(json.loads(f.read_text()))
                for f in sorted((results / target).glob(f"{profile.name}.*.json"))
            ]
            for target in ("netblk", "rbd")
        )
        if not netblk or not rbd:
            continue
        lines.append(
            f"| {profile.title} | {' / '.join(f'{v:,.0f}' for v in netblk)} "
            f"| {' / '.join(f'{v:,.0f}' for v in rbd)} "
            f"| {statistics.median(netblk) / statistics.median(rbd):.2f} |"
        )
    lines += ["", "CPU seconds per 1,000 requests (medians), what each process spent:", ""]
    names: list[str] = []
    for target in ("netblk", "rbd"):
        for f in (results / target).glob("*.json"):
            names += [
                n for n in json.loads(f.read_text()).get("netblk_bench_cpu_s", {}) if n not in names
            ]
    lines += [f"| profile | target | {' | '.join(names)} |", "|---|---|" + "---:|" * len(names)]
    for profile in RBD_PROFILES:
        for target in ("netblk", "rbd"):
            per_kilo: dict[str, list[float]] = collections.defaultdict(list)
            for f in sorted((results / target).glob(f"{profile.name}.*.json")):
                report = json.loads(f.read_text())
                ops = _requests(report)
                for name, seconds in report.get("netblk_bench_cpu_s", {}).items():
                    per_kilo[name].append(1000 * seconds / ops)
            if per_kilo:
                cells = " | ".join(
                    f"{statistics.median(per_kilo[n]):.2f}" if per_kilo[n] else "" for n in names
                )
                lines.append(f"| {profile.title} | {target} | {cells} |")
    return "\n".join(lines) + "\n"


def _iops(report: dict[str, Any]) -> float:
    """A run's IOPS: fio's, or what bench/rbd_host.py and rbd bench record."""
    if "jobs" in report:
        return Measurement.from_fio(report).iops
    return float(report["iops"])


def _requests(report: dict[str, Any]) -> float:
    """Requests a run completed, fio's (run without a ramp, so that they
    match the CPU time measured around the whole run) or rbd bench's."""
    if "jobs" in report:
        (job,) = report["jobs"]
        return float(job["read"]["total_ios"] + job["write"]["total_ios"])
    return float(report["ops"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    host = sub.add_parser("host")
    host.add_argument("results", type=Path)
    ab = sub.add_parser("ab")
    ab.add_argument("results", type=Path)
    ab.add_argument("--old", required=True, help="the old commit, as the table names it")
    rbd = sub.add_parser("rbd")
    rbd.add_argument("results", type=Path)
    rbd.add_argument(
        "--label", default="netblk.ko on RBD", help="what the netblk runs went through"
    )
    rend = sub.add_parser("render")
    rend.add_argument("results", type=Path)
    rend.add_argument("--doc", type=Path, required=True)
    rend.add_argument("--chart", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "host":
        host_facts(args.results)
        return 0
    if args.command == "ab":
        table = ab_table(args.results, args.old)
        (args.results / "ab.md").write_text(table)
        print(table, end="")
        return 0
    if args.command == "rbd":
        table = rbd_table(args.results, args.label)
        (args.results / "rbd.md").write_text(table)
        print(table, end="")
        return 0
    section = render(args.results, args.chart, args.doc)
    text = args.doc.read_text() if args.doc.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        print(f"{args.doc}: no {BEGIN} ... {END} section to replace", file=sys.stderr)
        return 1
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    args.doc.write_text(head + section + tail)
    print(f"bench: wrote {args.doc} and {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
