"""The driver's stats in the Prometheus text exposition format (0.0.4).

Each cumulative ``stats`` key ``K`` becomes a counter ``netblk_K_total``
(a key that could not be part of a metric name is left out: the driver's
are lowercase words joined by ``_``, anything else is not netblk.ko's),
``inflight`` a gauge, and ``netblk_state`` is 1 for each device's current
state and 0 for the others.  Label values need no escaping: device names
match ``DEVICE_RE`` (netblkN) and states are the driver's fixed words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from netblk_admin.sysfs import Snapshot, State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: A stats key that makes a valid metric name (and a sane one).
KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
PREFIX = "netblk_"
#: ``stats`` keys that are levels, not counts since load, and their names.
GAUGES = {"inflight": "netblk_inflight_requests"}
HELP = {
    "read_bytes": "Bytes read successfully.",
    "write_bytes": "Bytes written successfully.",
    "read_requests": "READ replies received.",
    "write_requests": "WRITE replies received.",
    "flush_requests": "FLUSH replies received.",
    "discard_requests": "TRIM replies received.",
    "write_zeroes_requests": "WRITE_ZEROES replies received.",
    "errors": "Requests completed with an error.",
    "timeouts": "Requests that hit request_timeout_ms.",
    "reconnects": "Connection losses that started a reconnect.",
    "failovers": "Connections made to another server of the list than the one before.",
    "inflight": "Requests sent and not yet answered.",
}


def render(snapshots: Sequence[Snapshot]) -> str:
    lines: list[str] = []
    keys = dict.fromkeys(
        key for snapshot in snapshots for key in snapshot.stats if KEY_RE.fullmatch(key)
    )
    for key in keys:
        gauge = key in GAUGES
        name = GAUGES[key] if gauge else f"{PREFIX}{key}_total"
        lines += _family(
            name,
            "gauge" if gauge else "counter",
            HELP.get(key, f"netblk.ko stats {key}.") + ("" if gauge else " Since module load."),
            ((f'device="{s.name}"', s.stats[key]) for s in snapshots if key in s.stats),
        )
    lines += _family(
        f"{PREFIX}state",
        "gauge",
        "1 for the device's connection state, 0 for the others.",
        (
            (f'device="{s.name}",state="{state}"', int(s.state == state))
            for s in snapshots
            for state in State
        ),
    )
    return "\n".join(lines) + "\n"


def _family(name: str, kind: str, text: str, samples: Iterable[tuple[str, int]]) -> list[str]:
    return [
        f"# HELP {name} {text}",
        f"# TYPE {name} {kind}",
        *(f"{name}{{{labels}}} {value}" for labels, value in samples),
    ]
